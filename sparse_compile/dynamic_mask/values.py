"""Connecting attached DMA parameters to the backend: tagged value projections.

``attach_dma`` gives a model's attention modules ``A`` and ``dt_proj``, but a model that never had
DMA does not use them in its forward, so Dynamo would never see them. ``tag_value_projection``
installs a forward hook on the module's value projection (``v_proj`` ...): while Dynamo traces,
the hook computes ``delta = exp(A * softplus(dt_proj(V_flat)))`` from the projection's output
``V_flat [B, L, Hkv * D]`` and passes the output through ``sparse_compile::dma_value_tag``, an
identity op that carries ``delta`` into the graph. Run eagerly, the hook does nothing: an
uncompiled model is unchanged.

The backend (``find_tagged_delta``) walks from an attention site's V back to the tag and calls
the DMA op with that delta; ``strip_value_tags`` then replaces every tag by its input, so no tag
reaches the compiled graph (and a ``delta`` nobody uses is dead code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Graph, Node

__all__ = [
    "VALUE_PROJECTIONS", "tag_value_projection", "find_tagged_delta", "strip_value_tags",
    "dma_delta_heads_first",
]

# Child names taken for the value projection, in this order (transformers' conventions).
VALUE_PROJECTIONS = ("v_proj", "value", "v", "v_lin", "value_proj")

# Ops between a value projection and the attention's V: views, head splits, GQA repeats, casts.
_PASS_THROUGH_METHODS = {
    "view", "reshape", "transpose", "permute", "contiguous", "expand", "to", "unsqueeze",
    "flatten", "float", "half", "bfloat16", "type_as",
}
_PASS_THROUGH_FUNCTIONS = {
    torch.reshape, torch.transpose, torch.permute, torch.unsqueeze, torch.flatten,
    torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.transpose, torch.Tensor.expand,
    torch.Tensor.contiguous, torch.Tensor.to,
}


@torch.library.custom_op("sparse_compile::dma_value_tag", mutates_args=())
def dma_value_tag(values: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Identity on ``values`` (a copy: custom ops may not alias); ``delta`` rides along."""
    return values.clone()


@dma_value_tag.register_fake
def _tag_fake(values, delta):
    return torch.empty_like(values)


def _tag_backward(ctx, grad):
    return grad, None


dma_value_tag.register_autograd(_tag_backward)


@torch.library.custom_op("sparse_compile::dma_delta_heads_first", mutates_args=())
def dma_delta_heads_first(delta: torch.Tensor) -> torch.Tensor:
    """``[B, L, H]`` -> contiguous ``[B, H, L]``, with a gradient that is contiguous in the
    ``[B, L, H]`` layout (a plain transpose hands the projection's backward a transposed
    gradient, whose strides AOTAutograd's eager replay does not expect)."""
    return delta.transpose(-1, -2).contiguous()


@dma_delta_heads_first.register_fake
def _heads_first_fake(delta):
    return delta.new_empty((*delta.shape[:-2], delta.shape[-1], delta.shape[-2]))


def _heads_first_backward(ctx, grad):
    return grad.transpose(-1, -2).contiguous()


dma_delta_heads_first.register_autograd(_heads_first_backward)


def _flat_delta(attention: nn.Module, flat_values: torch.Tensor) -> torch.Tensor:
    """Doge's ``exp(A * softplus(dt_proj(V_flat)))``: ``[B, L, Hkv]``."""
    return torch.exp(attention.A * F.softplus(attention.dt_proj(flat_values)))


def tag_value_projection(attention: nn.Module, projection_name: str | None = None) -> str:
    """Hook the value projection of ``attention`` (once); returns the projection's name.

    Raises ``ValueError`` when no child named in ``VALUE_PROJECTIONS`` (or ``projection_name``)
    is an ``nn.Module``.
    """
    names = (projection_name,) if projection_name else VALUE_PROJECTIONS
    for name in names:
        projection = getattr(attention, name, None)
        if isinstance(projection, nn.Module):
            break
    else:
        raise ValueError(
            f"{type(attention).__name__} has no value projection named {' / '.join(names)}: "
            "pass value_projection= to attach_dma"
        )
    if getattr(projection, "_dma_value_hook", None) is None:

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not torch.compiler.is_compiling():
                return None
            return dma_value_tag(output, _flat_delta(attention, output))

        projection._dma_value_hook = projection.register_forward_hook(hook)
    return name


def _is_tag(node: Node) -> bool:
    return node.op == "call_function" and node.target in (
        torch.ops.sparse_compile.dma_value_tag.default, torch.ops.sparse_compile.dma_value_tag,
        dma_value_tag,
    )


def _empty_cache_concat(node: Node) -> Node | None:
    """The one non-empty input of ``torch.cat([past, new], dim)`` when the past is empty (a
    fresh KV cache concatenating nothing), else None."""
    if node.op != "call_function" or node.target is not torch.cat or not node.args:
        return None
    inputs = [x for x in node.args[0] if not _is_empty(x)]
    return inputs[0] if len(inputs) == 1 else None


def _is_empty(x: object) -> bool:
    from sparse_compile.fx.graph_ops import tensor_value

    t = tensor_value(x)
    return t is not None and isinstance(t.numel(), int) and t.numel() == 0


def _passes_through(node: Node) -> bool:
    if node.op == "call_method":
        return node.target in _PASS_THROUGH_METHODS
    if node.op == "call_function":
        return node.target in _PASS_THROUGH_FUNCTIONS or getattr(
            node.target, "__name__", ""
        ) in ("getitem",) and _slices_all(node)
    return False


def _slices_all(node: Node) -> bool:
    """``x[:, :, None, :, :]``-style indexing (repeat_kv): only full slices and None."""
    index = node.args[1] if len(node.args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i == slice(None) or i is Ellipsis for i in items)


def find_tagged_delta(values: Node, depth: int = 12) -> Node | None:
    """The ``delta [B, L, Hkv]`` node tagged on the value projection behind ``values``, following
    views, transposes, GQA repeats, casts and an empty KV cache; None when there is none."""
    node = values
    for _ in range(depth):
        if not isinstance(node, Node):
            return None
        if _is_tag(node):
            return node.args[1]
        concat_input = _empty_cache_concat(node)
        if concat_input is not None:
            node = concat_input
            continue
        if not _passes_through(node):
            return None
        node = node.args[0]
    return None


def strip_value_tags(graph: Graph) -> int:
    """Replace every tag by its input; returns how many there were."""
    tags = [node for node in graph.nodes if _is_tag(node)]
    for node in tags:
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
    return len(tags)
