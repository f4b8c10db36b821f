"""sparse_compile: pattern-sparse attention for existing PyTorch models.

``torch.compile(model, backend="sparse", options={"pattern": "causal & sliding(1024)"})`` finds
the attention in the model's graph and runs it with Triton kernels that visit only the blocks the
pattern keeps. The names below are loaded on first use, so that registering the backend (which
imports this package) stays cheap and the pieces load only when a user touches them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # The pattern language, its semantics and layouts.
    "Pattern": "sparse_compile.patterns",
    "PatternError": "sparse_compile.patterns",
    "Layout": "sparse_compile.patterns",
    "parse": "sparse_compile.patterns",
    "dense": "sparse_compile.patterns",
    "causal": "sparse_compile.patterns",
    "window": "sparse_compile.patterns",
    "local": "sparse_compile.patterns",
    "sliding": "sparse_compile.patterns",
    "block": "sparse_compile.patterns",
    "axial": "sparse_compile.patterns",
    "strided": "sparse_compile.patterns",
    "fanout": "sparse_compile.patterns",
    "sink": "sparse_compile.patterns",
    "global_": "sparse_compile.patterns",
    "prefix": "sparse_compile.patterns",
    "dma": "sparse_compile.patterns",
    "topk": "sparse_compile.patterns",
    "heads": "sparse_compile.patterns",
    "predicate": "sparse_compile.patterns",
    "minimum": "sparse_compile.patterns",
    "maximum": "sparse_compile.patterns",
    # The dense float64 oracle every kernel and rewrite is checked against.
    "reference_attention": "sparse_compile.reference",
    # Where queries and keys sit: positions and packed documents.
    "PositionError": "sparse_compile.positions",
    "documents_from_cu_seqlens": "sparse_compile.positions",
    "documents_from_position_ids": "sparse_compile.positions",
    # Running attention and compiling models.
    "attention": "sparse_compile.functional",
    "sparsify": "sparse_compile.decorate",
    "explain": "sparse_compile.report",
    "calibrate": "sparse_compile.calibration",
    "sparse_backend": "sparse_compile.backend",
    "dma_attention": "sparse_compile.dynamic_mask.functional",
    "dma_delta": "sparse_compile.dynamic_mask.functional",
    "attach_dma": "sparse_compile.dynamic_mask.functional",
    "topk_attention": "sparse_compile.dynamic_mask.topk",
    "MissingDeltaError": "sparse_compile.dynamic_mask.dispatch",
    "dma_key_ranges": "sparse_compile.dynamic_mask.flex",
    "dma_block_mask": "sparse_compile.dynamic_mask.flex",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Load an exported name from the module that defines it (``global`` maps to ``global_``)."""
    if name == "global":
        name = "global_"
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'sparse_compile' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
