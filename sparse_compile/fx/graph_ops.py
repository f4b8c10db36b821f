"""Recognising torch-level operations in the FX graphs Dynamo produces.

Dynamo records the same operation in several spellings: ``torch.matmul``, ``operator.matmul``
(``a @ b``), ``Tensor.matmul`` as a ``call_method`` node, and so on. The predicates here hide
those spellings from the detection pass.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node


def _is(node: Any, functions: tuple[Any, ...], methods: tuple[str, ...]) -> bool:
    if not isinstance(node, Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    return False


def value(node: Any) -> Any:
    """The example value Dynamo recorded for ``node`` (a FakeTensor, SymInt, ...)."""
    if isinstance(node, Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def tensor_value(node: Any) -> torch.Tensor | None:
    """The example tensor of ``node``, or None when it is not a tensor."""
    v = value(node)
    return v if isinstance(v, torch.Tensor) else None


_IN_PLACE_FUNCTIONS = (operator.setitem, operator.iadd, operator.isub, operator.imul,
                       operator.itruediv, operator.iand, operator.ior)


def writes_in_place(node: Any) -> bool:
    """Whether ``node`` writes into its first argument (``x.index_copy_(...)``,
    ``x[i] = v``, ``x += y``)."""
    if not isinstance(node, Node):
        return False
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    return node.op == "call_function" and node.target in _IN_PLACE_FUNCTIONS


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` / keyword ``name`` of a call node (``call_method`` counts self)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_matmul(node: Any) -> bool:
    return _is(node, (torch.matmul, operator.matmul), ("matmul", "__matmul__"))


def is_bmm(node: Any) -> bool:
    return _is(node, (torch.bmm,), ("bmm",))


def is_baddbmm(node: Any) -> bool:
    return _is(node, (torch.baddbmm,), ("baddbmm",))


def is_einsum(node: Any) -> bool:
    return _is(node, (torch.einsum, torch.functional.einsum), ())


def is_product(node: Any) -> bool:
    """A batched matrix product: matmul, ``@``, bmm, baddbmm or einsum."""
    return is_matmul(node) or is_bmm(node) or is_baddbmm(node) or is_einsum(node)


def einsum_operands(node: Node) -> tuple[str, list[Any]]:
    """``(equation, operands)`` of an einsum node, whichever calling convention it used."""
    equation, *rest = node.args
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = list(rest[0])
    return equation, list(rest)


def is_softmax(node: Any) -> bool:
    return _is(node, (torch.softmax, F.softmax, torch.special.softmax), ("softmax",))


def is_log_softmax(node: Any) -> bool:
    return _is(node, (torch.log_softmax, F.log_softmax, torch.special.log_softmax),
               ("log_softmax",))


def is_exp(node: Any) -> bool:
    return _is(node, (torch.exp,), ("exp",))


def is_sum(node: Any) -> bool:
    return _is(node, (torch.sum,), ("sum",))


def reciprocal_source(node: Any) -> Any:
    """``x`` when ``node`` is ``1 / x`` (``x.reciprocal()``, ``torch.reciprocal(x)``,
    ``1 / x``, ``torch.div(1, x)``), else None."""
    if _is(node, (torch.reciprocal,), ("reciprocal",)):
        return node.args[0]
    if is_div(node) and node.op == "call_function" and constant_number(node.args[0]) == 1:
        return node.args[1]
    # Dynamo sometimes records ``1 / x`` as ``x.reciprocal() * 1``.
    if is_mul(node) and len(node.args) == 2:
        for inner, other in (node.args, node.args[::-1]):
            if constant_number(other) == 1 and isinstance(inner, Node):
                return reciprocal_source(inner) if inner is not node else None
    return None


def is_sdpa(node: Any) -> bool:
    return _is(node, (F.scaled_dot_product_attention,), ())


def is_mha(node: Any) -> bool:
    """``F.multi_head_attention_forward``, which Dynamo keeps as one call."""
    return _is(node, (F.multi_head_attention_forward,), ())


def is_flex_attention(node: Any) -> bool:
    """The ``flex_attention`` higher-order op, as Dynamo records FlexAttention calls."""
    return (isinstance(node, Node) and node.op == "call_function"
            and node.target is torch.ops.higher_order.flex_attention)


def is_dropout(node: Any) -> bool:
    return _is(node, (F.dropout, torch.dropout), ("dropout",))


def is_mul(node: Any) -> bool:
    return _is(node, (operator.mul, operator.imul, torch.mul), ("mul", "mul_"))


def is_div(node: Any) -> bool:
    return _is(node, (operator.truediv, operator.itruediv, torch.div, torch.true_divide),
               ("div", "div_", "true_divide"))


def is_add(node: Any) -> bool:
    return _is(node, (operator.add, operator.iadd, torch.add), ("add", "add_"))


def is_sub(node: Any) -> bool:
    return _is(node, (operator.sub, operator.isub, torch.sub), ("sub", "sub_"))


def is_masked_fill(node: Any) -> bool:
    return _is(node, (torch.masked_fill,), ("masked_fill",))


def is_where(node: Any) -> bool:
    return _is(node, (torch.where,), ("where",))


def is_tanh(node: Any) -> bool:
    return _is(node, (torch.tanh, F.tanh), ("tanh",))


_CASTS = ("to", "float", "half", "bfloat16", "double", "type", "type_as")
_IDENTITIES = ("contiguous", "clone")


def is_cast_or_identity(node: Any) -> bool:
    """Dtype casts and copies: they change neither values (up to rounding) nor layout."""
    if _is(node, (), _CASTS + _IDENTITIES):
        return True
    return _is(node, (torch.clone,), ())


def is_transpose(node: Any) -> bool:
    return _is(node, (torch.transpose,), ("transpose",))


def is_permute(node: Any) -> bool:
    return _is(node, (torch.permute,), ("permute",))


def is_reshape(node: Any) -> bool:
    return _is(node, (torch.reshape, torch.flatten), ("reshape", "view", "flatten"))


def is_expand(node: Any) -> bool:
    return _is(node, (), ("expand",))


def is_unsqueeze(node: Any) -> bool:
    return _is(node, (torch.unsqueeze,), ("unsqueeze",)) or (
        isinstance(node, Node)
        and node.op == "call_function"
        and node.target is operator.getitem
        and isinstance(node.args[1], tuple)
        and None in node.args[1]
    )


def is_repeat_interleave(node: Any) -> bool:
    return _is(node, (torch.repeat_interleave,), ("repeat_interleave",))


def constant_number(x: Any) -> float | None:
    """A Python number behind ``x``: a literal, or ``torch.full([], c)`` / ``torch.tensor(c)``."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, Node) and x.op == "call_function":
        if x.target is torch.full and len(x.args) >= 2 and isinstance(x.args[1], (int, float)):
            return float(x.args[1])
        if x.target is torch.tensor and x.args and isinstance(x.args[0], (int, float)):
            return float(x.args[0])
    return None


def ancestors(node: Node, limit: int = 10_000) -> set[Node]:
    """Every node ``node`` depends on (bounded, for pathological graphs)."""
    seen: set[Node] = set()
    stack = [node]
    while stack and len(seen) < limit:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def max_source(node: Any) -> tuple[Node, Any, Any] | None:
    """``(x, dim, keepdim)`` when ``node`` is a maximum of ``x`` over ``dim``
    (``x.amax(dim)``, ``x.max(dim)[0]`` / ``.values``, optionally ``.detach()``-ed), else None."""
    if _is(node, (torch.detach,), ("detach",)):
        node = node.args[0]
    if isinstance(node, Node) and node.op == "call_function" and node.target is operator.getitem:
        if node.args[1] != 0:
            return None
        node = node.args[0]
    if not _is(node, (torch.amax, torch.max), ("amax", "max")):
        return None
    dim = arg(node, 1, "dim")
    if dim is None or isinstance(dim, Node):  # over every axis, or elementwise of two tensors
        return None
    return node.args[0], dim, arg(node, 2, "keepdim", False)


def row_max_source(node: Any) -> Node | None:
    """``x`` when ``node`` is the maximum of ``x`` over its last axis with ``keepdim=True``
    (``x.amax(-1, keepdim=True)``, ``x.max(-1, keepdim=True)[0]`` / ``.values``, optionally
    ``.detach()``-ed), else None."""
    found = max_source(node)
    if found is None:
        return None
    x, dim, keepdim = found
    t = tensor_value(x)
    if t is None or not isinstance(dim, int) or dim % t.dim() != t.dim() - 1 or keepdim is not True:
        return None
    return x


def same_length(a: Any, b: Any) -> bool:
    """Whether two sizes (ints or SymInts) are equal for every input the graph serves:
    statically known, never by guessing (a symbolic pair that merely happens to be equal now
    is not the same length)."""
    if a is b:
        return True
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return bool(statically_known_true(a == b))
    except ImportError:  # pragma: no cover - older torch
        return isinstance(a, int) and a == b
