"""q, k and v of an attention site as graph values plus the permute that lays them out
``[batch..., L, D]``; peeling transposes and GQA head repetition off them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.fx import Node

import sparse_compile.fx.graph_ops as ops


@dataclass
class Operand:
    """``node`` permuted by ``perm`` (None: as is) is the operand in ``[batch..., L, D]``."""

    node: Any
    perm: tuple[int, ...] | None = None
    batch: Any = None  # a detect.BatchView regrouping the batch axes after the permute

    def shape(self) -> tuple[Any, ...]:
        t = ops.tensor_value(self.node)
        if t is None:
            raise ValueError("operand is not a tensor")
        shape = tuple(t.shape) if self.perm is None else tuple(t.shape[i] for i in self.perm)
        if self.batch is not None:
            return (*self.batch.sizes, *shape[-2:])
        return shape


def _swap_last_two(ndim: int) -> tuple[int, ...]:
    return (*range(ndim - 2), ndim - 1, ndim - 2)


def _transposed_source(node: Any, ndim: int) -> Node | None:
    """The input of ``node`` when ``node`` only swaps the last two axes."""
    if ops.is_transpose(node):
        dims = {d % ndim for d in (ops.arg(node, 1, "dim0"), ops.arg(node, 2, "dim1"))
                if isinstance(d, int)}
        if dims == {ndim - 2, ndim - 1}:
            return node.args[0]
    if ops.is_permute(node):
        dims = node.args[1:] if not isinstance(node.args[1], (list, tuple)) else node.args[1]
        if all(isinstance(d, int) for d in dims) and tuple(d % ndim for d in dims) == (
            _swap_last_two(ndim)
        ):
            return node.args[0]
    return None


def product_operands(a: Any, b: Any) -> tuple[Operand, Operand | None]:
    """q and k of ``a @ b`` (``b`` is kᵀ): k is ``b`` with its last two axes swapped, or the
    tensor ``b`` was transposed from."""
    ta, tb = ops.tensor_value(a), ops.tensor_value(b)
    if ta is None or tb is None or ta.dim() != tb.dim() or ta.dim() not in (3, 4):
        return Operand(a), None
    source = _transposed_source(b, tb.dim())
    if source is not None:
        return Operand(a), Operand(source)
    return Operand(a), Operand(b, _swap_last_two(tb.dim()))


def shapes_reason(q: Operand | None, k: Operand | None, v: Operand | None) -> str | None:
    """Why q, k, v ([batch..., L, D] each) cannot go to the sparse op, or None."""
    if q is None or k is None or v is None:
        return "q, k or v not found"
    try:
        sq, sk, sv = q.shape(), k.shape(), v.shape()
    except ValueError as err:
        return str(err)
    if not len(sq) == len(sk) == len(sv) or len(sq) not in (3, 4):
        return f"q, k, v are not all 3-D or all 4-D ({len(sq)}, {len(sk)}, {len(sv)})"
    if sk[-2] != sv[-2]:
        return f"keys and values differ in length ({sk[-2]} vs {sv[-2]})"
    if not sq[-1] == sk[-1] == sv[-1]:
        return f"head dimensions differ (q {sq[-1]}, k {sk[-1]}, v {sv[-1]})"
    if sk[:-2] != sv[:-2]:
        return "keys and values have different batch/head shapes"
    if sq[:-3] != sk[:-3]:
        return f"q and k have different batch sizes ({sq[:-3]} vs {sk[:-3]})"
    hq, hk = sq[-3], sk[-3]
    if hq != hk and (len(sq) == 3 or hq % hk != 0):
        return f"{hq} query heads cannot share {hk} key/value heads"
    return None


def peel_repeat_kv(node: Any) -> tuple[Node, int] | None:
    """``(x, n_rep)`` when ``node`` repeats each head of ``x [B, H, L, D]`` n_rep times in a
    row (``repeat_kv``: ``x[:, :, None].expand(B, H, n, L, D).reshape(B, H*n, L, D)``, or
    ``repeat_interleave(n, dim=1)``), else None."""
    out = ops.tensor_value(node)
    if out is None or out.dim() != 4:
        return None
    if ops.is_repeat_interleave(node):
        x, repeats = node.args[0], ops.arg(node, 1, "repeats")
        dim = ops.arg(node, 2, "dim")
        if isinstance(repeats, int) and isinstance(dim, int) and dim % 4 == 1:
            return x, repeats
        return None
    if not ops.is_reshape(node):
        return None
    expand = node.args[0]
    if not ops.is_expand(expand) or not ops.is_unsqueeze(expand.args[0]):
        return None
    unsqueezed = ops.tensor_value(expand.args[0])
    expanded = ops.tensor_value(expand)
    x = expand.args[0].args[0]
    tx = ops.tensor_value(x)
    if tx is None or tx.dim() != 4 or unsqueezed.dim() != 5 or expanded.dim() != 5:
        return None
    if tuple(unsqueezed.shape) != (tx.shape[0], tx.shape[1], 1, tx.shape[2], tx.shape[3]):
        return None
    n = expanded.shape[2]
    if tuple(expanded.shape) != (tx.shape[0], tx.shape[1], n, tx.shape[2], tx.shape[3]):
        return None
    return x, n


def peel_gqa(k: Operand, v: Operand) -> tuple[Operand, Operand]:
    """k and v without their GQA head repetition, when both repeat the same way."""
    if k.perm is not None or v.perm is not None or k.batch is not None or v.batch is not None:
        return k, v
    pk, pv = peel_repeat_kv(k.node), peel_repeat_kv(v.node)
    if pk is None or pv is None or pk[1] != pv[1]:
        return k, v
    if ops.tensor_value(pk[0]).shape[1] != ops.tensor_value(pv[0]).shape[1]:
        return k, v
    return Operand(pk[0]), Operand(pv[0])
