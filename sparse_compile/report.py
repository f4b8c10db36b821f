"""What the backend did to each attention site: report rows, logging, and ``explain``.

Every compile logs one line per site under the ``sparse_compile`` logger (INFO for rewritten
sites, WARNING for sites left as they are because they could not be proven).
``explain(model, *args, **options)`` compiles and runs the model once and returns the rows.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("sparse_compile")


@dataclass(frozen=True)
class SiteReport:
    """One attention site: where, what shapes, which pattern, and whether it was rewritten.

    ``shapes`` is ``{"q": (...), "k": (...), "v": (...)}`` in ``[batch..., L, D]`` layout;
    ``density`` the kept fraction of the Lq × Lk entries (None when unknown: dynamic pattern
    or symbolic lengths); ``reason`` says why a site was not rewritten (None if it was);
    ``mask`` what became of the model's own mask: ``"folded: ..."`` (proven from the graph
    and handed to the op as pattern, positions, key mask, documents: no Lq × Lk tensor),
    ``"bias: <reason>"`` (read as a bias tensor), or empty when the site has none.
    """

    module_path: str
    form: str
    shapes: dict[str, tuple[Any, ...]]
    pattern: str
    density: float | None
    rewritten: bool
    reason: str | None = None
    source: str = ""
    mask: str = ""

    def line(self) -> str:
        """One-line summary used in the log."""
        status = "rewritten" if self.rewritten else f"left as is: {self.reason}"
        q = "x".join(str(s) for s in self.shapes.get("q", ()))
        mask = f" (model mask {self.mask})" if self.mask else ""
        return (f"{self.module_path or '<root>'} [{self.form} q={q}] {self.pattern}: "
                f"{status}{mask}")


class Report(list):
    """The rows of ``explain``, one per attention site; ``print(report)`` shows a table."""

    def __str__(self) -> str:
        header = ("module", "form", "q shape", "k shape", "pattern", "density", "model mask",
                  "rewritten", "reason")
        rows = [header]
        for r in self:
            rows.append((
                r.module_path or "<root>",
                r.form,
                "x".join(str(s) for s in r.shapes.get("q", ())),
                "x".join(str(s) for s in r.shapes.get("k", ())),
                r.pattern,
                "-" if r.density is None else f"{r.density:.3f}",
                r.mask,
                "yes" if r.rewritten else "no",
                r.reason or "",
            ))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                 for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        found = sum(r.rewritten for r in self)
        lines.append(f"{len(self)} attention site(s), {found} rewritten")
        return "\n".join(lines)

    @property
    def rewritten(self) -> list[SiteReport]:
        return [r for r in self if r.rewritten]


_collectors: list[Report] = []


def record(row: SiteReport) -> None:
    """Log ``row`` and hand it to every ``explain`` in progress."""
    level = logging.INFO if row.rewritten else logging.WARNING
    log.log(level, "attention site %s", row.line())
    for collector in _collectors:
        collector.append(row)


@contextlib.contextmanager
def collecting() -> Iterator[Report]:
    """Collect the rows recorded inside the ``with`` block."""
    report = Report()
    _collectors.append(report)
    try:
        yield report
    finally:
        _collectors.remove(report)


def explain(model: Any, *args: Any, model_kwargs: dict[str, Any] | None = None,
            **options: Any) -> Report:
    """Compile ``model`` with the sparse backend and ``options``, run it once on ``args``
    (and the keyword inputs ``model_kwargs``, e.g. ``{"attention_mask": m, "use_cache":
    False}``) under ``torch.no_grad``, and return one ``SiteReport`` per attention site found.

    Dynamo's caches are reset first (``torch._dynamo.reset()``): code compiled earlier, or a
    frame that already reached Dynamo's recompile limit, would otherwise run without calling
    the backend and leave the report empty. Other compiled models recompile on their next call.

    Example:
        >>> report = explain(model, input_ids, pattern="causal & sliding(64)")
        >>> print(report)
    """
    from sparse_compile.backend import sparse_backend

    def backend(gm: Any, example_inputs: Any, **kwargs: Any) -> Any:
        # A fresh callable per call: Dynamo caches compiled code per backend.
        return sparse_backend(gm, example_inputs, options=options)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with collecting() as report, torch.no_grad():
        compiled(*args, **(model_kwargs or {}))
    return report
