"""Independent numpy definitions of every primitive and hypothesis strategies for patterns, for
DSL text written alongside its Python builder, and for random custom predicates."""

from __future__ import annotations

import dataclasses
import operator

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


# -- text and builder side by side ------------------------------------------------------------
_SPACE = st.sampled_from(["", " ", "  ", "\n", " # note\n"])


@st.composite
def _leaf_text(draw) -> tuple[str, P.Pattern]:
    """A primitive written as DSL text (positional, named or mixed arguments, free spacing)
    together with the same primitive from its Python builder."""
    name = draw(st.sampled_from(sorted(BUILDERS)))
    params = draw(PARAMS[name])
    built = BUILDERS[name](*params)
    names = [f.name for f in dataclasses.fields(built)]
    positional = draw(st.integers(0, len(params)))
    args = [str(v) for v in params[:positional]]
    named = [f"{n}{draw(_SPACE)}={draw(_SPACE)}{v}" for n, v in
             zip(names[positional:], params[positional:], strict=True)]
    named = draw(st.permutations(named))
    if not params:
        return name + draw(st.sampled_from(["", "()", "( )"])), built
    return f"{name}({draw(_SPACE)}{(',' + draw(_SPACE)).join(args + list(named))})", built


def text_and_pattern(max_leaves: int = 5):
    """``(text, pattern)``: DSL text and the equal pattern built from Python, composed
    independently (the text is fully parenthesised and never produced by ``str``)."""

    def extend(children):
        def binary(op):
            def make(pair):
                (ta, a), (tb, b) = pair
                return f"({ta}) {op} ({tb})", (a & b) if op == "&" else (a | b)
            return st.tuples(children, children).map(make)

        return st.one_of(
            binary("&"), binary("|"), children.map(lambda c: (f"~({c[0]})", ~c[1])),
            st.lists(children, min_size=1, max_size=3).map(
                lambda cs: ("heads(" + ", ".join(t for t, _ in cs) + ")",
                            P.heads(*(p for _, p in cs)))),
        )

    return st.recursive(_leaf_text(), extend, max_leaves=max_leaves)


# -- random custom predicates, as trees evaluated three ways ----------------------------------
_INT = st.integers(-20, 40).map(lambda n: ("int", n))
TERMS = st.recursive(
    st.one_of(st.just(("q",)), st.just(("k",)), _INT),
    lambda t: st.one_of(
        st.tuples(st.sampled_from(["+", "-", "*", "min", "max"]), t, t),
        st.tuples(st.sampled_from(["//", "%"]), t, st.integers(1, 9).map(lambda n: ("int", n))),
        st.tuples(st.just("abs"), t),
    ),
    max_leaves=5,
)
CONDITIONS = st.recursive(
    st.tuples(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), TERMS, TERMS),
    lambda c: st.one_of(st.tuples(st.sampled_from(["&", "|"]), c, c), st.tuples(st.just("~"), c)),
    max_leaves=3,
)
_BINARY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv,
           "%": operator.mod, "<": operator.lt, "<=": operator.le, ">": operator.gt,
           ">=": operator.ge, "==": operator.eq, "!=": operator.ne, "&": operator.and_,
           "|": operator.or_}


def evaluate_tree(tree, q, k, constant, minimum, maximum):
    """Evaluate a tree of ``TERMS`` / ``CONDITIONS`` with the given leaves and min/max."""
    op, *args = tree
    if op == "q":
        return q
    if op == "k":
        return k
    if op == "int":
        return constant(args[0])
    vals = [evaluate_tree(a, q, k, constant, minimum, maximum) for a in args]
    if op == "abs":
        return abs(vals[0])
    if op == "~":
        return ~vals[0]
    if op in ("min", "max"):
        return (minimum if op == "min" else maximum)(*vals)
    return _BINARY[op](*vals)


def tree_text(tree) -> str:
    """DSL text of a tree (fully parenthesised)."""
    op, *args = tree
    if op in ("q", "k"):
        return op
    if op == "int":
        return f"({args[0]})" if args[0] < 0 else str(args[0])
    parts = [tree_text(a) for a in args]
    if op in ("abs", "min", "max"):
        return f"{op}({', '.join(parts)})"
    if op == "~":
        return f"~({parts[0]})"
    return f"({parts[0]} {op} {parts[1]})"
