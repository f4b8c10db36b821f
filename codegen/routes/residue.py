"""Residue-class route for strided patterns: ``strided(s) & R`` as ``s`` small problems.

``strided(s)`` keeps (q, k) only when ``q ≡ k (mod s)``, so under it query row ``r + s·a``
sees only keys ``r + s·b`` of the same residue ``r``. Viewed by residue class, the attention
splits into ``s`` independent problems of ``L / s`` rows each, and the rest of the pattern
``R`` becomes a band on the compressed indices (``causal`` stays ``causal``, ``sliding(w)``
becomes ``sliding(ceil(w / s))``, ``window(x, y)`` becomes ``window(x // s, y // s)``). The
kernels then visit ``L² / s`` entries instead of every causal block (each of which keeps only
one entry in ``s``). No index tensor and, for the usual layouts, no copy of q, k, v: a class
is a strided view (rows ``s`` apart) that the kernels read through their stride arguments.

Taken when ``R`` is a conjunction of ``dense``, ``causal``, ``sliding``, ``window`` and
``local`` or their negations, both lengths are multiples of ``s`` (classes of equal length,
aligned ends), and there is no bias or dropout (their offsets are positional); otherwise the
general route runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = ["ResidueRoute", "as_layout", "class_grid", "class_layout", "residue_route",
           "rows_of_grid", "to_classes"]


@dataclass(frozen=True)
class ResidueRoute:
    """``s`` residue classes; ``inner`` the pattern on the compressed indices (DSL text)."""

    s: int
    inner: str


def _compressed(leaf, s: int) -> str | None:
    """DSL text of ``leaf`` on the indices of one residue class (positions r + s·i)."""
    import sparse_compile.patterns.primitives as p
    from sparse_compile.patterns.nodes import Not

    if isinstance(leaf, Not):  # exact: each rule maps the class's pairs one to one
        inner = _compressed(leaf.inner, s)
        return None if inner is None else f"~({inner})"
    if isinstance(leaf, p.Dense):
        return "dense"
    if isinstance(leaf, p.Causal):
        return "causal"
    if isinstance(leaf, p.Sliding):  # 0 <= q - k < w  ->  0 <= a - b < ceil(w / s)
        return f"sliding({-(-leaf.w // s)})"
    if isinstance(leaf, p.Window):  # -x <= k - q <= y  ->  -(x // s) <= b - a <= y // s
        return f"window({leaf.before // s}, {leaf.after // s})"
    if isinstance(leaf, p.Local):
        half = (leaf.w // 2) // s
        return f"window({half}, {half})"
    return None


@lru_cache(maxsize=256)
def _route_for_text(pattern_text: str) -> ResidueRoute | None:
    from sparse_compile.patterns import parse
    from sparse_compile.patterns.layout import intersection_leaves
    from sparse_compile.patterns.primitives import Strided

    leaves = intersection_leaves(parse(pattern_text))
    strided = [leaf for leaf in leaves if isinstance(leaf, Strided)]
    if len(strided) != 1 or strided[0].s < 2:
        return None
    s = strided[0].s
    inner = [_compressed(leaf, s) for leaf in leaves if leaf is not strided[0]]
    if any(text is None for text in inner):
        return None
    return ResidueRoute(s, " & ".join(inner) or "dense")


def residue_route(pattern_text: str, lq: int, lk: int, has_bias: bool,
                  dropout_p: float) -> ResidueRoute | None:
    """The residue route for this call, or None when the general route must run."""
    if has_bias or dropout_p > 0.0:
        return None
    route = _route_for_text(pattern_text)
    if route is None or lq % route.s or lk % route.s or lq < route.s:
        return None
    return route


def _fits_batch_major(x: torch.Tensor) -> bool:
    """Batch and head fold into one index (batch stride = heads x head stride)."""
    b, h = x.shape[0], x.shape[1]
    return b == 1 or h == 1 or x.stride(0) == h * x.stride(1)


def _fits_head_major(x: torch.Tensor) -> bool:
    """Residue and head fold into one index r·H + h (row stride = heads x head stride: the
    [B, L, H, D] layout models transpose from)."""
    return x.shape[1] == 1 or x.stride(2) == x.shape[1] * x.stride(1)


def class_layout(tensors: list[torch.Tensor], same_heads: bool) -> str:
    """How all of ``tensors`` are viewed by class: "batch" (batch·head as the batch, the
    residue as the head; needs Hq == Hkv) or "head" (residue·H + head as the head, which keeps
    GQA's head grouping). "copy" when neither view fits every tensor."""
    if same_heads and all(_fits_batch_major(t) for t in tensors):
        return "batch"
    if all(_fits_head_major(t) for t in tensors):
        return "head"
    return "copy"


def to_classes(x: torch.Tensor, s: int, layout: str) -> torch.Tensor:
    """[B, H, L, D] (or [B, H, L]) as a 4-D (3-D) view whose heads are residue classes; rows
    of class r are x[..., r::s, ...]. ``layout`` from ``class_layout`` ("batch" or "head")."""
    b, h, length = x.shape[:3]
    n = length // s
    sb, sh, sl = x.stride()[:3]
    tail_shape, tail_stride = tuple(x.shape[3:]), tuple(x.stride()[3:])
    # A folded index steps by the inner dim's stride (the outer one's when the inner has size
    # 1: torch leaves the stride of a size-1 dim arbitrary).
    if layout == "batch":
        shape, stride = (b * h, s, n), (sh if h > 1 else sb, sl, s * sl)
    else:
        shape, stride = (b, s * h, n), (sb, sh if h > 1 else sl, s * sl)
    return x.as_strided(shape + tail_shape, stride + tail_stride, x.storage_offset())


def class_grid(y: torch.Tensor, b: int, h: int, layout: str) -> torch.Tensor:
    """A contiguous kernel output in class order (``to_classes``'s shape) as a view
    ``[B, H, L / s, s, ...]``: element ``[.., a, r, ..]`` is row ``a·s + r``. No copy: the
    merge of two parts (codegen/tl/merge.py) and the sum of gradients read it in place."""
    tail = tuple(y.shape[3:])
    tail_dims = tuple(range(4, 4 + len(tail)))
    s, n = (y.shape[1], y.shape[2]) if layout == "batch" else (y.shape[1] // h, y.shape[2])
    if layout == "batch":
        return y.reshape((b, h, s, n) + tail).transpose(2, 3)
    return y.reshape((b, s, h, n) + tail).permute((0, 2, 3, 1) + tail_dims)


def rows_of_grid(grid: torch.Tensor) -> torch.Tensor:
    """A ``[B, H, L / s, s, ...]`` grid (``class_grid``) as a contiguous [B, H, L, ...]."""
    b, h, n, s = grid.shape[:4]
    return grid.reshape((b, h, n * s) + tuple(grid.shape[4:])).contiguous()


def as_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` copied, if needed, into a layout ``to_classes`` can view: contiguous for "batch",
    [B, L, H, D] storage for "head"."""
    if layout == "batch":
        return x if _fits_batch_major(x) else x.contiguous()
    return x if _fits_head_major(x) else x.transpose(1, 2).contiguous().transpose(1, 2)
