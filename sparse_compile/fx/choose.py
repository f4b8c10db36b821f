"""Backend options and the choice of a pattern for each attention site.

Precedence, highest first:

1. ``assign``: a mapping from module-path globs (``"model.layers.*.self_attn"``, matched with
   ``fnmatch`` against the dotted path of the attention module) or class names
   (``"LlamaAttention"``, matched against every module class enclosing the site and their
   base classes) to patterns;
   the first entry that matches, in the mapping's order, wins;
2. a ``@sparsify(...)`` decorator on the enclosing module class or on a function or method the
   attention runs in (the innermost decorated one wins);
3. ``pattern``: one pattern for every site;
4. the default ``dense``, which still routes attention through the sparse op.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

COMPILERS = ("inductor", "eager", "aot_eager")
ON_UNSUPPORTED = ("warn", "error")


def as_pattern(pattern: Any) -> Any:
    """A Pattern from a Pattern or DSL text (raises ``PatternError`` on bad text)."""
    from sparse_compile.patterns import Pattern, parse

    if isinstance(pattern, Pattern):
        return pattern
    if isinstance(pattern, str):
        return parse(pattern)
    raise TypeError(f"a pattern must be DSL text or a Pattern, not {type(pattern).__name__}")


@dataclass(frozen=True)
class BackendOptions:
    """Validated ``options=`` of ``torch.compile(..., backend="sparse")``."""

    pattern: Any = None
    assign: tuple[tuple[str, Any], ...] = ()
    min_length: int = 0
    compiler: str = "inductor"
    on_unsupported: str = "warn"
    mode: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> BackendOptions:
        """Check and normalise user options; unknown keys raise ``TypeError``."""
        options = dict(options or {})
        known = {"pattern", "assign", "min_length", "compiler", "on_unsupported", "mode"}
        unknown = set(options) - known
        if unknown:
            raise TypeError(
                f"unknown sparse backend option(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        compiler = options.get("compiler", "inductor")
        if compiler not in COMPILERS:
            raise ValueError(f"compiler must be one of {COMPILERS}, not {compiler!r}")
        on_unsupported = options.get("on_unsupported", "warn")
        if on_unsupported not in ON_UNSUPPORTED:
            raise ValueError(f"on_unsupported must be one of {ON_UNSUPPORTED}")
        min_length = options.get("min_length", 0)
        if not isinstance(min_length, int) or min_length < 0:
            raise ValueError("min_length must be a non-negative int")
        pattern = options.get("pattern")
        assign_map = dict(options.get("assign") or {})
        assign = tuple((str(key), as_pattern(value)) for key, value in assign_map.items())
        return cls(
            pattern=None if pattern is None else as_pattern(pattern),
            assign=assign,
            min_length=min_length,
            compiler=compiler,
            on_unsupported=on_unsupported,
            mode=options.get("mode"),
        )


def choose_pattern(
    options: BackendOptions,
    module_path: str,
    module_classes: list[type],
    decorated: Any,
) -> tuple[Any, str]:
    """``(pattern, where it came from)`` for one site; ``decorated`` is the decorator's
    pattern for the site or None."""
    names = {base.__name__ for cls in module_classes for base in cls.__mro__}
    for key, pattern in options.assign:
        if fnmatch.fnmatchcase(module_path, key) or key in names:
            return pattern, f"assign[{key!r}]"
    if decorated is not None:
        return decorated, "decorator"
    if options.pattern is not None:
        return options.pattern, "pattern option"
    return as_pattern("dense"), "default"
