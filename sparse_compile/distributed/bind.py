"""Binding the backend's rewritten attention calls to the sharded attention.

Under context parallelism each rank's graph sees its own tokens only, so a rewritten site's
call of ``attention`` / ``placed_attention`` becomes a call of ``sharded_attention``: same
q, k, v, pattern, scale and soft-capping, positions taken from the sharding (every token at
its place in the whole sequence). The model's mask must have been folded into the pattern
(causal, sliding window); what the op would otherwise receive from the model's local view
(positions counted on the shard, document ids the shard's jumps in ``position_ids`` suggest)
is dropped, and what cannot be sharded (a bias, dropout, ALiBi, a relative-bias table) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Graph, Node

from sparse_compile.distributed.sharded import sharded_attention


@dataclass(frozen=True)
class ContextParallelSpec:
    """What the backend needs to bind sites: the sharding kind and the group's registered
    name (``sharded.register_group``). Passed as ``options["context_parallel"]``."""

    sharding: str
    group_name: str


def _attention_call(out: Node) -> Node:
    """The ``attention`` / ``placed_attention`` call feeding a rewritten site's output."""
    from sparse_compile.functional import attention, placed_attention

    seen, frontier = set(), [out]
    while frontier:
        node = frontier.pop()
        if node.op == "call_function" and node.target in (attention, placed_attention):
            return node
        seen.add(node)
        frontier.extend(n for n in node.all_input_nodes if n not in seen)
    raise ValueError("no sparse attention call above the rewritten site")


def bind_site(graph: Graph, out: Node, spec: ContextParallelSpec, path: str) -> None:
    """Make the rewritten site whose output is ``out`` call ``sharded_attention``; raises
    ``UnsupportedAttentionError`` (naming ``path``) for what context parallelism cannot
    shard."""
    from sparse_compile.backend import UnsupportedAttentionError

    where = path or "<root>"
    try:
        call = _attention_call(out)
    except ValueError:
        raise UnsupportedAttentionError(
            f"{where}: context parallelism shards calls of the static-pattern attention op; "
            "this site was rewritten otherwise (a dynamic pattern, nn.MultiheadAttention or "
            "FlexAttention)") from None
    kwargs = dict(call.kwargs)
    if kwargs.get("bias") is not None:
        raise UnsupportedAttentionError(
            f"{where}: the model's mask or bias could not be folded into the pattern, and "
            "context parallelism shards positional patterns only (causal, sliding windows, "
            "...): pass no padding mask, or fold the bias into the pattern")
    if kwargs.get("dropout_p", 0.0) not in (0, 0.0):
        raise UnsupportedAttentionError(f"{where}: attention dropout under context "
                                        "parallelism (set the model's attention dropout to 0)")
    if kwargs.get("alibi") is not None:
        raise UnsupportedAttentionError(f"{where}: ALiBi under context parallelism")
    if kwargs.get("rel_bias") is not None:
        raise UnsupportedAttentionError(f"{where}: a relative-bias table under context "
                                        "parallelism")
    call.target = sharded_attention
    call.kwargs = {"scale": kwargs.get("scale"), "softcap": kwargs.get("softcap"),
                   "sharding": spec.sharding, "group_name": spec.group_name}
