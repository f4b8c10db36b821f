"""``attach_dma``: give any model's attention modules DMA's learned content score.

Doge learns, per attention module, ``A`` (one scalar per kv head) and ``dt_proj`` (a linear map
from the flattened values ``[.., Hkv * D]`` to ``Hkv``), and scores every key by
``delta = exp(A * softplus(dt_proj(V_flat)))``. ``attach_dma`` registers the same parameters on
the attention modules of a model that never had them, initialised as Doge initialises them
(``A = 0`` so that ``delta = 1`` and selection starts from position order; ``dt_proj`` weight
``N(0, initializer_range)``, bias 0), so optimizers see them, and hooks the module's value
projection so that, under ``torch.compile``, its output carries ``delta`` into the graph
(``sparse_compile.dynamic_mask.values``; eager runs are unchanged). Compiled with
``backend="sparse", options={"pattern": "dma(keep=...)"}``, each attention site then runs
``dma_attention`` with that ``delta`` and the model's own mask, and A and dt_proj train.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparse_compile.dynamic_mask.values import tag_value_projection

__all__ = ["DmaAttachment", "attach_dma", "module_delta"]


@dataclass(frozen=True)
class DmaAttachment:
    """One attention module that received DMA parameters."""

    path: str
    kv_heads: int
    head_dim: int
    keep: int


def _shape_of(module: nn.Module, config: object | None) -> tuple[int, int] | None:
    """(kv heads, head dim) of an attention module, read from its attributes or config."""
    cfg = getattr(module, "config", None) or config
    kv = getattr(module, "num_key_value_heads", None) or getattr(cfg, "num_key_value_heads", None)
    heads = getattr(module, "num_heads", None) or getattr(cfg, "num_attention_heads", None)
    kv = kv or heads
    head_dim = getattr(module, "head_dim", None) or getattr(cfg, "head_dim", None)
    if head_dim is None and cfg is not None and heads:
        hidden = getattr(cfg, "hidden_size", None)
        head_dim = hidden // heads if hidden else None
    if not kv or not head_dim:
        return None
    return int(kv), int(head_dim)


def _is_attention(name: str, module: nn.Module) -> bool:
    cls = type(module).__name__
    return cls.endswith(("Attention", "SelfAttention", "Attn")) and not cls.startswith("Flash")


def attach_dma(
    model: nn.Module,
    keep: int,
    modules: list[str] | None = None,
    std: float | None = None,
    bias: bool = False,
    value_projection: str | None = None,
) -> list[DmaAttachment]:
    """Register ``A`` and ``dt_proj`` on each attention module of ``model`` (in place).

    Args:
        model: any ``nn.Module``; attention modules are those named in ``modules`` (dotted
            paths), else those whose class name ends in ``Attention`` and whose kv heads and
            head dim can be read (``num_key_value_heads``/``num_heads``/``head_dim`` or the
            model's ``config``).
        keep: keys kept per query row; stored as ``module.dma_keep``.
        std: init std of ``dt_proj.weight``; default ``config.initializer_range`` or 0.02.
        bias: give ``dt_proj`` a bias (Doge: ``config.attention_bias``).
        value_projection: name of the child module producing ``V_flat [B, L, Hkv * D]``;
            default the first of ``v_proj``, ``value``, ``v``, ``v_lin``, ``value_proj``.

    Returns:
        One ``DmaAttachment`` per module. Modules that already have ``A``/``dt_proj`` (Doge)
        are left as they are, only ``dma_keep`` is set.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    config = getattr(model, "config", None)
    if std is None:
        std = float(getattr(config, "initializer_range", 0.02))
    wanted = set(modules) if modules is not None else None
    attached = []
    for name, module in model.named_modules():
        if wanted is not None and name not in wanted:
            continue
        if wanted is None and not _is_attention(name, module):
            continue
        shape = _shape_of(module, config)
        if shape is None:
            if wanted is not None:
                raise ValueError(f"cannot read kv heads / head dim of {name!r}")
            continue
        kv, head_dim = shape
        if not (hasattr(module, "A") and hasattr(module, "dt_proj")):
            tag_value_projection(module, value_projection)  # raises before any change
            param = next(module.parameters(), None)
            device = param.device if param is not None else None
            dtype = param.dtype if param is not None else None
            module.A = nn.Parameter(torch.zeros(kv, device=device, dtype=dtype))
            module.dt_proj = nn.Linear(kv * head_dim, kv, bias=bias, device=device, dtype=dtype)
            with torch.no_grad():
                module.dt_proj.weight.normal_(0.0, std)
                if module.dt_proj.bias is not None:
                    module.dt_proj.bias.zero_()
        module.dma_keep = keep
        attached.append(DmaAttachment(name, kv, head_dim, keep))
    if wanted is not None and len(attached) != len(wanted):
        missing = wanted - {a.path for a in attached}
        raise ValueError(f"no such modules: {sorted(missing)}")
    return attached


def module_delta(module: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """delta ``[B, Hkv, Lk]`` of an attached module for its values v ``[B, Hkv, Lk, D]``."""
    from sparse_compile.dynamic_mask.functional import (
        dma_delta,  # dynamic_mask re-exports attach_dma from here
    )

    proj = module.dt_proj
    return dma_delta(v, proj.weight, proj.bias, module.A)
