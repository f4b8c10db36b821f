"""``@sparsify(pattern)``: declaring in code which pattern a model's attention uses.

On an ``nn.Module`` class, the pattern applies to every attention computed while a module of
that class (or a subclass) runs. (When the decorated class is the very module passed to
``torch.compile``, Dynamo does not record it as a module on the stack; then only attention in
methods defined in the decorated class body itself is matched.) On a function or method, it
applies to attention computed in that function's body, including functions it calls that
Dynamo inlines. The decorated object is returned unchanged apart from a marker, so the model
runs exactly as before when it is not compiled with ``backend="sparse"``.

Precedence against the backend options is ``assign`` > decorator > ``pattern`` > default (see
``sparse_compile.fx.choose``).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, TypeVar

from sparse_compile.fx.choose import as_pattern

T = TypeVar("T")

_ATTRIBUTE = "__sparse_compile_pattern__"


@dataclass(frozen=True)
class _Span:
    filename: str
    first: int
    last: int


_functions: dict[_Span, Any] = {}


def sparsify(pattern: Any) -> Any:
    """Decorator setting the attention pattern of a module class, function or method.

    Example:
        >>> @sparsify("causal & sliding(256)")
        ... class MyAttention(torch.nn.Module): ...
    """
    parsed = as_pattern(pattern)

    def mark(obj: T) -> T:
        if inspect.isclass(obj):
            setattr(obj, _ATTRIBUTE, parsed)
            # The module torch.compile is called on is absent from Dynamo's module stack:
            # its own methods are found through the recorded Python stack instead.
            for member in vars(obj).values():
                if inspect.isfunction(member):
                    _register(member, parsed)
            return obj
        fn = inspect.unwrap(obj)
        if getattr(fn, "__code__", None) is None:
            raise TypeError(f"sparsify cannot decorate {obj!r}")
        _register(fn, parsed)
        setattr(obj, _ATTRIBUTE, parsed)
        return obj

    return mark


def _register(fn: Any, pattern: Any) -> None:
    lines, first = inspect.getsourcelines(fn)
    _functions[_Span(fn.__code__.co_filename, first, first + len(lines) - 1)] = pattern


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)')


def decorated_pattern(module_classes: list[type], stack_trace: str | None) -> Any:
    """The pattern a decorator sets for a site, or None.

    ``module_classes`` are the classes of the modules running the site, outermost first;
    ``stack_trace`` is the node's recorded Python stack (outermost frame first). The innermost
    decorated function frame wins; a decorated function or method beats a decorated class;
    among classes the innermost decorated module wins.
    """
    frames = [(m["file"], int(m["line"])) for m in _FRAME.finditer(stack_trace or "")]
    for filename, line in reversed(frames):
        for span, pattern in _functions.items():
            if span.filename == filename and span.first <= line <= span.last:
                return pattern
    for cls in reversed(module_classes):
        pattern = getattr(cls, _ATTRIBUTE, None)
        if pattern is not None:
            return pattern
    return None
