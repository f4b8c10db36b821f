"""Every zoo formulation is found and rewritten, and matches the pattern applied by hand,
forward and backward, for ``dense`` and a sparse pattern (the two sparse patterns alternate
along the zoo, so each meets masked and unmasked, causal and bidirectional formulations);
look-alikes are left alone."""

from __future__ import annotations

import pytest
import torch

from sparse_compile.report import collecting
from tests.conftest import rel_error
from tests.fx.by_hand import pattern_by_hand
from tests.fx.conftest import assert_grads_close
from tests.fx.zoo import LOOKALIKES, ZOO

# Both sparse patterns keep the diagonal, so no row the zoo's own masks leave is emptied.
SPARSE = ["sliding(3)", "strided(3) | block(4)"]
CASES = [(entry, pattern) for i, entry in enumerate(ZOO)
         for pattern in ("dense", SPARSE[i % len(SPARSE)])]


def _run(model: torch.nn.Module, x: torch.Tensor, compiled=None):
    """(output, grads of x and of every parameter) of one forward and backward."""
    x = x.clone().requires_grad_(True)
    out = (model if compiled is None else compiled)(x)
    out = out[0] if isinstance(out, tuple) else out
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    grads = [x.grad] + [p.grad for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize(("entry", "pattern"), CASES,
                         ids=lambda e: e if isinstance(e, str) else e.__name__)
def test_zoo_matches_pattern_by_hand(entry, pattern):
    torch.manual_seed(0)
    model = entry()
    x = model.example_input()
    compiled = torch.compile(model, backend="sparse",
                             options={"pattern": pattern, "compiler": "aot_eager"})
    with collecting() as report:
        out, grads = _run(model, x, compiled)
    assert len(report) == entry.sites, str(report)
    assert all(row.rewritten for row in report), str(report)
    with pattern_by_hand(pattern, exp=getattr(entry, "softmax_written_out", False)):
        ref, ref_grads = _run(model, x)
    assert rel_error(out, ref) < 1e-4
    assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("entry,expected", LOOKALIKES, ids=lambda e: getattr(e, "__name__", ""))
def test_lookalikes_are_not_rewritten(entry, expected):
    torch.manual_seed(0)
    model = entry()
    x = model.example_input()
    compiled = torch.compile(model, backend="sparse", options={"compiler": "eager"})
    with collecting() as report:
        out = compiled(x)
    ref = model(x)
    out, ref = (out[0], ref[0]) if isinstance(out, tuple) else (out, ref)
    assert not any(row.rewritten for row in report), str(report)
    if expected is not None:
        assert len(report) == expected, str(report)
    assert all(row.reason for row in report)
    assert rel_error(out, ref) < 1e-6
