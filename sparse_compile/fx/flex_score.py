"""What a FlexAttention ``score_mod`` does to the scores, in the op's terms.

``score_mod(score, b, h, q_idx, kv_idx, *buffers)`` is a graph of 0-dim tensors; ``score`` is
already ``scale · q·k``. The op computes two of its forms itself, never as an Lq × Lk tensor:
the identity, logit soft-capping ``c · tanh(score / c)`` (the op's ``softcap``, forward and
backward), and ALiBi, ``score + slope(h) · (kv_idx - q_idx)`` with the slope any function of
the head and the buffers (the op's ``alibi``: the kernels add ``slope · (k_pos - q_pos)``; the
slopes are computed once per call by running the ``score_mod`` itself on every head), and a
relative-bias table, ``score + table[h, q_idx - kv_idx + c]`` or ``score + table[q_idx - kv_idx
+ c]`` (either sign of the difference, ``c`` an integer, ``table`` a tensor the ``score_mod``
captures: the op's ``rel_bias``, read in the kernels and differentiated; its ``[Hq, Lq + Lk -
1]`` entries are computed once per call by running the ``score_mod`` on one (q_idx, kv_idx)
pair of each difference, a gather of O(Hq · (Lq + Lk)), never Lq × Lk). Anything else is refused
with a reason: materialising a bias as Lq × Lk would cost what the rewrite saves.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

from torch.fx import GraphModule, Node

import sparse_compile.fx.graph_ops as ops


@dataclass(frozen=True)
class ScoreMod:
    """A ``score_mod`` the op computes: ``softcap`` (0 for none); ``alibi``: the scores plus a
    per-head slope times ``kv_idx - q_idx``; ``relative``: the scores plus a captured table's
    entry at ``q_idx - kv_idx`` (and the head)."""

    softcap: float = 0.0
    alibi: bool = False
    relative: bool = False


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
    if _is_alibi(result, placeholders):
        return ScoreMod(alibi=True)
    if _is_relative_table(result, placeholders):
        return ScoreMod(relative=True)
    return _why_not(score_mod, placeholders)


_CASTS = ("to", "float", "type", "contiguous")


def _bare(node: Node) -> Node:
    """``node`` without the casts around it."""
    while isinstance(node, Node) and (node.target in _CASTS) and node.args:
        node = node.args[0]
    return node


def _is_alibi(result: Node, placeholders: list[Node]) -> bool:
    """Whether ``result`` is ``score + A(h) · (kv_idx - q_idx)`` (also written ``score -
    A(h) · (q_idx - kv_idx)``), ``A`` reading only the head and the buffers."""
    score, b, _, q_idx, kv_idx, *_ = placeholders
    term = None
    if ops.is_add(result) and len(result.args) == 2 and score in result.args:
        term = result.args[1] if result.args[0] is score else result.args[0]
    elif ops.is_sub(result) and result.args[0] is score:
        term = result.args[1]
    if not isinstance(term, Node) or not ops.is_mul(term) or len(term.args) != 2:
        return False
    for slope, distance in (term.args, term.args[::-1]):
        distance = _bare(distance)
        if not (isinstance(distance, Node) and ops.is_sub(distance)):
            continue
        pair = tuple(_bare(a) for a in distance.args)
        direction = 1 if pair == (kv_idx, q_idx) else -1 if pair == (q_idx, kv_idx) else 0
        # Either sign: the slopes are read off the score_mod itself (``flex_rewrite.py``).
        if direction != 0 and not _reads(slope, {score, b, q_idx, kv_idx}):
            return True
    return False


def _is_relative_table(result: Node, placeholders: list[Node]) -> bool:
    """Whether ``result`` is ``score + table[h, D]`` or ``score + table[D]`` (casts allowed),
    ``table`` a captured tensor and ``D`` the difference of ``q_idx`` and ``kv_idx`` (either
    order) plus or minus an integer constant."""
    score, _, h, q_idx, kv_idx, *buffers = placeholders
    if not (ops.is_add(result) and len(result.args) == 2 and score in result.args):
        return False
    term = _bare(result.args[1] if result.args[0] is score else result.args[0])
    if not (isinstance(term, Node) and term.op == "call_function"
            and term.target is operator.getitem and len(term.args) == 2
            and term.args[0] in buffers):
        return False
    index = term.args[1]
    if isinstance(index, tuple | list):
        if len(index) != 2 or _bare(index[0]) is not h:
            return False
        index = index[1]
    return _is_difference(_bare(index), q_idx, kv_idx)


def _is_difference(node: object, q_idx: Node, kv_idx: Node) -> bool:
    """Whether ``node`` is ``q_idx - kv_idx`` or ``kv_idx - q_idx``, plus or minus integer
    constants."""
    while isinstance(node, Node) and (ops.is_add(node) or ops.is_sub(node)) \
            and len(node.args) == 2:
        first, second = (_bare(a) for a in node.args)
        if {first, second} == {q_idx, kv_idx} and ops.is_sub(node):
            return True
        if _integer(second):
            node = first
        elif ops.is_add(node) and _integer(first):
            node = second
        else:
            return False
    return False


def _integer(x: object) -> bool:
    c = ops.constant_number(x)
    return c is not None and float(c).is_integer()


def _reads(x: object, forbidden: set[Node]) -> bool:
    """Whether ``x`` depends on any of ``forbidden``."""
    if not isinstance(x, Node):
        return False
    return x in forbidden or bool(ops.ancestors(x) & forbidden)


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
        return ("score_mod adds a bias of query and key positions other than ALiBi's "
                "slope * (k - q) and a captured table read at (h,) q_idx - kv_idx + c: the "
                "kernels compute only those, and an Lq x Lk bias would cost what the rewrite "
                "saves")
    if any(b in reads for b in buffers):
        return "score_mod reads tensors (a bias or a mask added to the scores)"
    if _uses_only_affine(score_mod, score):
        return "score_mod rescales or shifts the scores (not soft-capping)"
    return "score_mod is neither the identity nor soft-capping c * tanh(score / c)"


def _uses_only_affine(score_mod: GraphModule, score: Node) -> bool:
    calls = [n for n in score_mod.graph.nodes if n.op in ("call_function", "call_method")]
    return bool(calls) and all(ops.is_mul(n) or ops.is_div(n) or ops.is_add(n) or ops.is_sub(n)
                               for n in calls)

