"""The public API, listed: names, custom ops, the backend's entry point, the command line.

Internal modules may move between folders; what users import and call may not. A change to any
list below is a change of the public API and must be deliberate.
"""

import importlib
import importlib.metadata
import pkgutil
import subprocess
import sys

import pytest
import torch

import sparse_compile

PUBLIC_NAMES = [
    # The pattern language.
    "Pattern", "PatternError", "Layout", "parse", "dense", "causal", "window", "local",
    "sliding", "block", "axial", "strided", "fanout", "sink", "global_", "prefix", "dma", "topk",
    "heads", "predicate", "minimum", "maximum",
    # Attention, the oracle, compiling models.
    "attention", "reference_attention", "sparsify", "explain", "calibrate", "sparse_backend",
    # Positions and packed documents.
    "PositionError", "documents_from_cu_seqlens", "documents_from_position_ids",
    # Dynamic patterns.
    "dma_attention", "dma_delta", "attach_dma", "topk_attention", "MissingDeltaError",
    "dma_key_ranges", "dma_block_mask",
]

CUSTOM_OPS = [
    "attention", "attention_backward", "dma_attention_fwd", "dma_attention_bwd",
    "dma_attention_masked", "dma_attention_masked_bwd", "topk_attention_fwd",
    "topk_attention_bwd", "topk_mask_keys", "dma_value_tag", "dma_delta_heads_first",
]


def test_public_names_are_exactly_the_listed_ones() -> None:
    assert sorted(sparse_compile.__all__) == sorted(PUBLIC_NAMES)


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_every_public_name_imports(name: str) -> None:
    exec(f"from sparse_compile import {name}", {})
    assert getattr(sparse_compile, name) is not None


def test_every_module_imports_and_leaves_the_pattern_builders_in_place() -> None:
    # Importing a subpackage binds its name on the parent package: none may shadow a public
    # name (a package ``sparse_compile/dma/`` would replace the ``dma`` pattern builder).
    for root in ("sparse_compile",):
        package = importlib.import_module(root)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{root}."):
            if info.name.endswith("__main__"):
                continue
            importlib.import_module(info.name)
    for name in PUBLIC_NAMES:
        value = getattr(sparse_compile, name)
        assert not isinstance(value, type(sparse_compile)), f"sparse_compile.{name} is a module"
    assert sparse_compile.dma(keep=8) == sparse_compile.parse("dma(keep=8)")


@pytest.mark.parametrize("op", CUSTOM_OPS)
def test_custom_op_is_registered(op: str) -> None:
    import sparse_compile.dynamic_mask.masked  # noqa: F401
    import sparse_compile.dynamic_mask.op  # noqa: F401
    import sparse_compile.dynamic_mask.topk  # noqa: F401
    import sparse_compile.dynamic_mask.values  # noqa: F401
    import sparse_compile.op  # noqa: F401

    assert hasattr(torch.ops.sparse_compile, op)


def test_backend_entry_point_and_registration() -> None:
    (entry,) = [ep for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")
                if ep.name == "sparse"]
    assert entry.load() is sparse_compile.sparse_backend
    assert "sparse" in torch._dynamo.list_backends()


@pytest.mark.parametrize("argv", [["--help"], ["show", "--help"], ["demo", "--help"]])
def test_command_line_answers(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "sparse_compile", *argv],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage" in done.stdout.lower()
