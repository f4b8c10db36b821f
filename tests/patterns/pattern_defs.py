"""Independent numpy definitions of every primitive and a hypothesis strategy for patterns."""

from __future__ import annotations

import numpy as np
import sparse_compile.patterns as P
from hypothesis import strategies as st


def grid(lq: int, lk: int) -> tuple[np.ndarray, np.ndarray]:
    """Absolute query positions [lq, 1] and key indices [1, lk] (bottom-right alignment)."""
    q = np.arange(lq)[:, None] + (lk - lq)
    k = np.arange(lk)[None, :]
    return q, k


def _is_power(d: np.ndarray, base: int) -> np.ndarray:
    out = np.zeros(d.shape, dtype=bool)
    p = 1
    while p <= max(1, int(d.max(initial=0))):
        out |= d == p
        p *= base
    return out


def _axial(q, k, cols, offset=0):
    r, c = q - offset, k - offset
    return (q < offset) | (k < offset) | (r // cols == c // cols) | (r % cols == c % cols)


# name -> (builder, numpy keep(q, k, *params)); numpy's // and % already have Python semantics.
NUMPY = {
    "dense": lambda q, k: np.ones(np.broadcast(q, k).shape, dtype=bool),
    "causal": lambda q, k: k <= q,
    "window": lambda q, k, a, b: (q - a <= k) & (k <= q + b),
    "local": lambda q, k, w: np.abs(q - k) <= w // 2,
    "sliding": lambda q, k, w: (q - w < k) & (k <= q),
    "block": lambda q, k, s: q // s == k // s,
    "axial": _axial,
    "strided": lambda q, k, s: (q - k) % s == 0,
    "fanout": lambda q, k, base: (q == k) | _is_power(q - k, base),
    "sink": lambda q, k, n: np.broadcast_to(k < n, np.broadcast(q, k).shape),
    "global": lambda q, k, n: (k < n) | (q < n),
    "prefix": lambda q, k, n: (q < n) & (k < n),
}

BUILDERS = {
    "dense": lambda: P.dense, "causal": lambda: P.causal, "window": P.window, "local": P.local,
    "sliding": P.sliding, "block": P.block, "axial": P.axial, "strided": P.strided,
    "fanout": P.fanout, "sink": P.sink, "global": P.global_, "prefix": P.prefix,
}

# Parameter strategies per primitive (small sizes so that blocks see every situation).
PARAMS = {
    "dense": st.just(()),
    "causal": st.just(()),
    "window": st.tuples(st.integers(0, 70), st.integers(0, 70)),
    "local": st.tuples(st.integers(1, 150)),
    "sliding": st.tuples(st.integers(1, 150)),
    "block": st.tuples(st.integers(1, 100)),
    "axial": st.tuples(st.integers(1, 40), st.integers(0, 40)),
    "strided": st.tuples(st.integers(1, 70)),
    "fanout": st.tuples(st.integers(2, 5)),
    "sink": st.tuples(st.integers(1, 150)),
    "global": st.tuples(st.integers(1, 150)),
    "prefix": st.tuples(st.integers(1, 400)),
}

PREDICATES = [
    P.predicate(lambda q, k: (q - k) % 7 < 3),
    P.predicate(lambda q, k: (q // 16 + k // 8) % 3 == 0),
    P.predicate(lambda q, k: P.minimum(q, 40) >= k),
    P.predicate(lambda q, k: (k * 3 <= q) | (k % 5 == 1)),
]


@st.composite
def primitive_patterns(draw) -> P.Pattern:
    name = draw(st.sampled_from(sorted(BUILDERS)))
    return BUILDERS[name](*draw(PARAMS[name]))


def patterns(max_leaves: int = 4, per_head: bool = True):
    """Random pattern expressions: primitives, predicates, &, |, ~ and (optionally) heads."""
    leaf = st.one_of(primitive_patterns(), st.sampled_from(PREDICATES))

    def extend(children):
        options = [
            st.tuples(children, children).map(lambda ab: ab[0] & ab[1]),
            st.tuples(children, children).map(lambda ab: ab[0] | ab[1]),
            children.map(lambda a: ~a),
        ]
        if per_head:
            options.append(st.lists(children, min_size=1, max_size=3).map(lambda ps: P.heads(*ps)))
        return st.one_of(*options)

    return st.recursive(leaf, extend, max_leaves=max_leaves)
