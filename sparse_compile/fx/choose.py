"""Backend options and the choice of a pattern for each attention site.

Precedence, highest first:

1. ``assign``: a mapping from module-path globs (``"model.layers.*.self_attn"``, matched with
   ``fnmatch`` against the dotted path of the attention module) or class names
   (``"LlamaAttention"``, matched against every module class enclosing the site and their
   base classes) to patterns;
   the first entry that matches, in the mapping's order, wins. A key may end in ``#i`` (a
   non-negative integer) to match only the ``i``-th attention site, in graph order, of the
   modules its glob or class name matches (``"model.layers.0.mixer#1"``: the second attention
   computed while that module runs); without the suffix a key matches every site of the
   module;
2. a ``@sparsify(...)`` decorator on the enclosing module class or on a function or method the
   attention runs in (the innermost decorated one wins);
3. ``pattern``: one pattern for every site;
4. the default ``dense``, which still routes attention through the sparse op.
"""

from __future__ import annotations

import fnmatch
import re
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
    context_parallel: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> BackendOptions:
        """Check and normalise user options; unknown keys raise ``TypeError``."""
        options = dict(options or {})
        known = {"pattern", "assign", "min_length", "compiler", "on_unsupported", "mode",
                 "context_parallel"}
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
            context_parallel=options.get("context_parallel"),
        )


def site_key(module_path: str, index: int | None = None) -> str:
    """The ``assign`` key matching exactly the module at ``module_path`` (glob characters
    escaped) and, with ``index``, only its ``index``-th attention site (``"blocks.0#1"``)."""
    key = re.sub(r"([*?[])", r"[\1]", module_path)
    return key if index is None else f"{key}#{index}"


def split_key(key: str) -> tuple[str, int | None]:
    """An ``assign`` key as ``(glob or class name, site index or None)``:
    ``"blocks.*#1"`` → ``("blocks.*", 1)``, ``"blocks.*"`` → ``("blocks.*", None)``.
    Only a suffix of ASCII digits is an index: any other key is matched whole."""
    target, hash_, index = key.rpartition("#")
    if not hash_ or not (index.isascii() and index.isdigit()):
        return key, None
    return target, int(index)


def choose_pattern(
    options: BackendOptions,
    module_path: str,
    module_classes: list[type],
    decorated: Any,
    index: int = 0,
) -> tuple[Any, str]:
    """``(pattern, where it came from)`` for one site; ``decorated`` is the decorator's
    pattern for the site or None; ``index`` is the site's order among the attention sites of
    its module in the graph (0 for the first), matched by keys ending in ``#index``."""
    names = {base.__name__ for cls in module_classes for base in cls.__mro__}
    for key, pattern in options.assign:
        target, wanted = split_key(key)
        if wanted is not None and wanted != index:
            continue
        if fnmatch.fnmatchcase(module_path, target) or target in names:
            return pattern, f"assign[{key!r}]"
    if decorated is not None:
        return decorated, "decorator"
    if options.pattern is not None:
        return options.pattern, "pattern option"
    return as_pattern("dense"), "default"
