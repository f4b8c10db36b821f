"""What a FlexAttention ``score_mod`` does to the scores, in the op's terms.

``score_mod(score, b, h, q_idx, kv_idx, *buffers)`` is a graph of 0-dim tensors; ``score`` is
already ``scale · q·k``. The op computes two of its forms itself, never as an Lq × Lk tensor:
the identity, and logit soft-capping ``c · tanh(score / c)`` (the op's ``softcap``, forward
and backward). Anything else is refused with a reason: a position bias (ALiBi's
``score + slope[h] · (kv_idx - q_idx)``, a relative-bias table indexed by ``q_idx - kv_idx``)
would need an additive per-head bias of ``q - k`` computed inside the kernels, which they do
not have, and materialising it as an Lq × Lk bias would cost what the rewrite saves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.fx import GraphModule, Node

import sparse_compile.fx.graph_ops as ops


@dataclass(frozen=True)
class ScoreMod:
    """A ``score_mod`` the op computes: ``softcap`` (0 for none)."""

    softcap: float = 0.0


def read_score_mod(score_mod: GraphModule) -> ScoreMod | str:
    """The ``ScoreMod`` of ``score_mod``, or the reason the op cannot compute it."""
    placeholders = [n for n in score_mod.graph.nodes if n.op == "placeholder"]
    result = _returned(score_mod)
    if len(placeholders) < 5 or result is None:
        return "score_mod is not a function of (score, b, h, q_idx, kv_idx)"
    score = placeholders[0]
    if result is score:
        return ScoreMod()
    cap = _softcap(result, score)
    if cap is not None:
        return ScoreMod(softcap=cap)
    return _why_not(score_mod, placeholders)


def _returned(gm: GraphModule) -> Node | None:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    value = output.args[0]
    if isinstance(value, tuple | list):
        value = value[0] if len(value) == 1 else None
    return value if isinstance(value, Node) else None


def _softcap(node: Node, score: Node) -> float | None:
    """``c`` when ``node`` is ``c · tanh(score / c)`` (or ``tanh(score · (1 / c)) · c``)."""
    if not ops.is_mul(node) or len(node.args) != 2:
        return None
    for inner, outer in (node.args, node.args[::-1]):
        c = ops.constant_number(outer)
        if c is None or c <= 0 or not ops.is_tanh(inner):
            continue
        scaled = inner.args[0]
        if ops.is_div(scaled) and scaled.args[0] is score:
            divisor = ops.constant_number(scaled.args[1])
            if divisor is not None and math.isclose(divisor, c, rel_tol=1e-6):
                return c
        if ops.is_mul(scaled) and score in scaled.args:
            other = scaled.args[1] if scaled.args[0] is score else scaled.args[0]
            factor = ops.constant_number(other)
            if factor is not None and math.isclose(factor * c, 1.0, rel_tol=1e-6):
                return c
    return None


def _why_not(score_mod: GraphModule, placeholders: list[Node]) -> str:
    """The reason a ``score_mod`` other than the identity and soft-capping is refused."""
    score, _, _, q_idx, kv_idx, *buffers = placeholders
    reads = {p for p in (q_idx, kv_idx, *buffers) if p.users}
    if q_idx in reads and kv_idx in reads:
        return ("score_mod adds a bias of query and key positions (ALiBi, a relative-bias "
                "table): the kernels have no per-head bias of q - k, and an Lq x Lk bias "
                "would cost what the rewrite saves")
    if any(b in reads for b in buffers):
        return "score_mod reads tensors (a bias or a mask added to the scores)"
    if _uses_only_affine(score_mod, score):
        return "score_mod rescales or shifts the scores (not soft-capping)"
    return "score_mod is neither the identity nor soft-capping c * tanh(score / c)"


def _uses_only_affine(score_mod: GraphModule, score: Node) -> bool:
    calls = [n for n in score_mod.graph.nodes if n.op in ("call_function", "call_method")]
    return bool(calls) and all(ops.is_mul(n) or ops.is_div(n) or ops.is_add(n) or ops.is_sub(n)
                               for n in calls)

