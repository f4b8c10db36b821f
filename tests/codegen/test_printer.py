"""The sympy -> Triton printer and the printed predicates, run through Triton and compared with
the patterns' numeric truth (``Pattern.evaluate``) and with sympy itself."""

from __future__ import annotations

import importlib.util
import random
import sys

import pytest
import sympy
import torch
from sparse_compile.codegen.tl.predicate import interval_bounds, predicate_source
from sparse_compile.codegen.tl.printer import HELPERS_SOURCE, PrintError, print_triton
from sparse_compile.patterns import parse
from sparse_compile.patterns.symbolic import IsPowerOf, K, Q

from tests.codegen.attention_cases import PRIMITIVES, random_pattern

GRID_KERNEL = '''
@triton.jit
def _grid_kernel(Out, LO, HI, hp, Q0, NQ: tl.constexpr, NK: tl.constexpr):
    q_pos = Q0 + tl.arange(0, NQ)
    k_pos = tl.arange(0, NK)
    kept = _keep(q_pos[:, None], k_pos[None, :], hp)
    tl.store(Out + tl.arange(0, NQ)[:, None] * NK + k_pos[None, :], kept.to(tl.int8))
    lo, hi = _bounds(q_pos, hp)
    tl.store(LO + tl.arange(0, NQ), lo)
    tl.store(HI + tl.arange(0, NQ), hi)
'''


def load_source(src: str, tmp_path, name: str):
    path = tmp_path / f"{name}.py"
    path.write_text("import triton\nimport triton.language as tl\n" + src)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def run_grid(src: str, tmp_path, name: str, q0: int, nq: int, nk: int, hp: int = 0):
    """(keep [nq, nk] bool, lo [nq], hi [nq]) as computed by Triton for q in [q0, q0 + nq)."""
    mod = load_source(HELPERS_SOURCE + src + GRID_KERNEL, tmp_path, name)
    out = torch.full((nq, nk), 7, dtype=torch.int8)
    lo = torch.empty(nq, dtype=torch.int32)
    hi = torch.empty(nq, dtype=torch.int32)
    mod._grid_kernel[(1,)](out, lo, hi, hp, q0, NQ=nq, NK=nk)
    assert ((out == 0) | (out == 1)).all()
    return out.bool(), lo, hi


def expr_source(expr: sympy.Basic) -> str:
    return f'''
@triton.jit
def _keep(q_pos, k_pos, hp):
    return (({print_triton(expr)}) + q_pos * 0 + k_pos * 0) != 0


@triton.jit
def _bounds(q_pos, hp):
    lo = q_pos * 0
    return lo.to(tl.int32), lo.to(tl.int32)
'''


def sympy_grid(expr: sympy.Basic, q0: int, nq: int, nk: int) -> torch.Tensor:
    f = sympy.lambdify((Q, K), expr, modules=[{"IsPowerOf": _is_power_of_py}, "sympy"])
    return torch.tensor([[bool(f(q, k)) for k in range(nk)] for q in range(q0, q0 + nq)])


def _is_power_of_py(d: int, base: int) -> bool:
    return bool(IsPowerOf(sympy.Integer(d), sympy.Integer(base)))


@pytest.mark.parametrize(
    "expr",
    [
        sympy.Eq(sympy.floor((Q - K) / 3), -2),
        sympy.Eq(sympy.Mod(Q - K, 5), 3),
        sympy.Eq(sympy.Mod(K - Q, -4), -1),
        sympy.Eq(sympy.Mod(Q - K, 8), 0),
        sympy.Eq(sympy.Mod(K - Q, 4), 3),
        sympy.Eq(sympy.Mod(2 * K - Q, 1), 0),
        sympy.Le(sympy.floor((K - 2 * Q) / 7), sympy.floor((Q - 20) / 4)),
        sympy.Ge(sympy.Min(Q - 3, K + 1), sympy.Max(10 - Q, K - 5)),
        sympy.And(Q >= K, sympy.Not(sympy.Eq(sympy.Mod(K, 3), 0))),
        sympy.Or(K < 2, sympy.Gt(Q, K + 6)),
        IsPowerOf(Q - K, 2),
        IsPowerOf(K - Q + 5, 3),
        sympy.Ne(sympy.floor(Q / 4), sympy.floor(K / 4)),
    ],
    ids=str,
)
def test_printed_expression_has_python_semantics(expr, tmp_path):
    # q0 < 0 puts negative operands into // and %, where Triton's truncation would differ.
    q0, nq, nk = -20, 64, 32
    got, _, _ = run_grid(expr_source(expr), tmp_path, f"expr_{abs(hash(str(expr)))}", q0, nq, nk)
    assert torch.equal(got, sympy_grid(expr, q0, nq, nk)), print_triton(expr)


def test_power_of_two_modulo_prints_as_a_mask():
    # Python's a % 2**n equals a & (2**n - 1), negative a included: no remainder instruction.
    assert print_triton(sympy.Mod(Q - K, 64)).endswith("& 63)")
    assert "_pymod" in print_triton(sympy.Mod(Q - K, 48))


def test_infinite_bounds_print_as_large_integers():
    assert int(print_triton(sympy.oo)) > 1 << 29
    assert int(print_triton(-sympy.oo)) < -(1 << 29)


@pytest.mark.parametrize("bad", [Q / 2 < K, sympy.Symbol("Z") < K, sympy.sin(Q) < K])
def test_unprintable_expressions_raise(bad):
    with pytest.raises(PrintError):
        print_triton(bad)


def _check_pattern(text: str, tmp_path, lq: int = 48, lk: int = 56) -> None:
    p = parse(text)
    src, is_interval = predicate_source(p)
    heads = p.num_heads if p.per_head else 1
    q0 = lk - lq
    name = "pred_" + str(abs(hash(text)))
    for hp in range(heads):
        keep, lo, hi = run_grid(src, tmp_path, f"{name}_{hp}", q0, 64, 64, hp)
        q = torch.arange(q0, q0 + 64)[:, None]
        k = torch.arange(64)[None, :]
        want = p.evaluate(q, k, torch.tensor(hp)) if p.per_head else p.evaluate(q, k)
        assert torch.equal(keep, want), f"printed _keep differs from evaluate for {text!r}"
        if is_interval:
            by_bounds = (k >= lo[:, None]) & (k <= hi[:, None])
            assert torch.equal(by_bounds, want), f"printed _bounds wrong for {text!r}"
    assert is_interval == (interval_bounds(p) is not None)


@pytest.mark.parametrize("text", PRIMITIVES + ["heads(causal, local(5), strided(3))"])
def test_primitive_predicates_print_exactly(text, tmp_path):
    _check_pattern(text, tmp_path)


def test_random_composition_predicates_print_exactly(tmp_path):
    rng = random.Random()
    for _ in range(6):
        _check_pattern(random_pattern(rng), tmp_path)
