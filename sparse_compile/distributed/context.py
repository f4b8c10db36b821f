"""``context_parallel``: a model whose sequence is split over the ranks of a 1-D mesh.

Every rank passes the same whole batch; the wrapper keeps its rank's part of the sequence
(``input_ids``, ``position_ids``, labels, any tensor with the sequence length on
``seq_dim``), runs the model compiled with ``backend="sparse"`` and its sites bound to the
sharded attention (``bind.py``), and reduces the loss as PyTorch's context parallelism does:
each rank's loss covers its tokens, gradients are averaged over the group (by DDP / FSDP over
the same ranks, or ``average_gradients``), and the loss returned holds the whole batch's value.

Causal language models (transformers' ``*ForCausalLM``) shift their labels inside the model;
split naively, the last token of a shard would lose its label. The wrapper shifts them on the
whole sequence first and passes ``shift_labels`` and ``num_items_in_batch`` (the batch's
count of labelled tokens), so each rank's loss is its share of the global mean.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sparse_compile.distributed.bind import ContextParallelSpec
from sparse_compile.distributed.plan import exchange_plan
from sparse_compile.distributed.report import CommunicationReport, communication_report
from sparse_compile.distributed.sharded import register_group
from sparse_compile.distributed.sharding import Sharding, ShardingError, default_sharding

IGNORE_INDEX = -100


def _group_of(mesh: Any) -> dist.ProcessGroup:
    """The process group of a 1-D ``DeviceMesh`` (or a ``ProcessGroup`` itself)."""
    if isinstance(mesh, dist.ProcessGroup):
        return mesh
    ndim = getattr(mesh, "ndim", None)
    if ndim is None:
        raise TypeError(f"context_parallel takes a DeviceMesh or a ProcessGroup, got "
                        f"{type(mesh).__name__}")
    if ndim != 1:
        raise ValueError(f"context_parallel needs a 1-D mesh (the ranks the sequence is split "
                         f"over), got a {ndim}-D mesh {mesh}: pass mesh['cp'] of a larger mesh")
    return mesh.get_group()


class ContextParallelModel(nn.Module):
    """The model returned by ``context_parallel``; call it as the model itself."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup, sharding: Sharding,
                 pattern: Any, seq_dim: int, compile_options: dict[str, Any]) -> None:
        super().__init__()
        self.module = model
        self.group = group
        self.sharding = sharding
        self.rank = dist.get_rank(group)
        self.seq_dim = seq_dim
        self._pattern = pattern
        spec = ContextParallelSpec(sharding.kind, register_group(group))
        options = {**compile_options, "context_parallel": spec}
        if pattern is not None:
            options["pattern"] = pattern
        self.compiled = torch.compile(model, backend="sparse", options=options)

    def shard(self, x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        """This rank's part of ``x``, the whole sequence along ``dim`` (default seq_dim)."""
        return self.sharding.shard(x, self.rank, self.seq_dim if dim is None else dim)

    def gather(self, x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        """The whole sequence from every rank's part ``x`` (e.g. logits), on every rank."""
        dim = self.seq_dim if dim is None else dim
        parts = [torch.empty_like(x) for _ in range(self.sharding.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return self.sharding.unshard(parts, dim)

    def forward(self, **inputs: Any) -> Any:
        """Run the model on this rank's part of ``inputs`` (the whole batch, identical on every
        rank). Returns the model's output; its ``loss`` (when labels were given) holds the
        whole batch's loss, its other sequence outputs (logits) are this rank's part."""
        length = self._length(inputs)
        self.sharding.check(length)
        inputs = self._prepare(dict(inputs), length)
        local = {name: self.shard(value) if _along(value, self.seq_dim, length) else value
                 for name, value in inputs.items()}
        out = self.compiled(**local)
        loss = getattr(out, "loss", None)
        if loss is not None:
            out.loss = self._reduce(loss)
        return out

    def _length(self, inputs: dict[str, Any]) -> int:
        for name in ("input_ids", "inputs_embeds"):
            if isinstance(inputs.get(name), torch.Tensor):
                return inputs[name].shape[self.seq_dim]
        raise ValueError("context_parallel needs input_ids or inputs_embeds to know the "
                         "sequence length")

    def _prepare(self, inputs: dict[str, Any], length: int) -> dict[str, Any]:
        """Positions made explicit, padding refused, labels shifted on the whole sequence."""
        mask = inputs.pop("attention_mask", None)
        if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
            raise ShardingError("context parallelism takes batches without padding: the "
                                "attention_mask has zeros")
        ids = inputs.get("input_ids", inputs.get("inputs_embeds"))
        batch = ids.shape[0]
        positions = inputs.get("position_ids")
        if positions is None:
            positions = torch.arange(length, device=ids.device).expand(batch, length)
        elif bool((positions.diff(dim=-1) != 1).any()):
            raise ShardingError("context parallelism takes position_ids that count up by one "
                                "(no packed documents)")
        inputs["position_ids"] = positions
        labels = inputs.get("labels")
        if labels is not None and "shift_labels" not in inputs:
            shifted = nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
            inputs["shift_labels"] = shifted
            inputs.setdefault("num_items_in_batch", (shifted != IGNORE_INDEX).sum())
        return inputs

    def _reduce(self, loss: torch.Tensor) -> torch.Tensor:
        """The whole batch's loss as its value; as gradient, this rank's share times the
        group's size (averaging gradients over the group then gives the exact gradient)."""
        world = self.sharding.world
        total = loss.detach().clone()
        dist.all_reduce(total, group=self.group)
        scaled = loss * world
        return scaled + (total - scaled).detach()

    def average_gradients(self) -> None:
        """Average the parameters' gradients over the group (what DDP / FSDP over the same
        ranks do); call after ``backward`` when the model is not wrapped in either."""
        for p in self.module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.group)
                p.grad /= self.sharding.world

    def communication(self, length: int, batch: int, kv_heads: int, head_dim: int,
                      dtype: torch.dtype, pattern: Any = None) -> CommunicationReport:
        """Bytes each rank receives per attention call, forward and backward, for a sequence
        of ``length`` tokens (``pattern`` defaults to the one given to ``context_parallel``;
        the model's folded mask, e.g. ``causal``, is part of the pattern the sites run: pass
        it as the sites show it in ``sparse_compile.explain``)."""
        text = str(pattern if pattern is not None else self._pattern)
        return communication_report(text, length, self.sharding, batch=batch,
                                    kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)


def _along(value: Any, dim: int, length: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > dim and value.shape[dim] == length


def context_parallel(model: nn.Module, mesh: Any, pattern: Any = None, *,
                     sharding: str | None = None, seq_dim: int = 1,
                     **options: Any) -> ContextParallelModel:
    """``model`` compiled with ``backend="sparse"``, its sequence split over ``mesh``.

    Each rank calls the result with the same whole batch; the sequence (length divisible by
    the group's size, or twice it for zigzag) is split along ``seq_dim`` and each site's
    attention receives from other ranks only the keys ``pattern`` keeps for its queries
    (``plan.py``). Forward and backward equal the single-process model's.

    Args:
        model: a model the backend can compile (a transformers causal LM, or any module
            whose attention's mask folds into a pattern: no padding masks, no packing).
        mesh: a 1-D ``DeviceMesh`` (or a ``ProcessGroup``) of the ranks sharing a sequence.
        pattern: the backend's ``pattern`` option (DSL text or Pattern); ``assign`` and the
            other backend options go in ``options``.
        sharding: ``"contiguous"`` or ``"zigzag"`` (load-balanced); default ``zigzag`` for
            patterns without a band (causal work grows along the sequence), else
            ``contiguous``.
        seq_dim: the sequence dim of the inputs (1 for ``[B, L]`` ids).

    Returns:
        A ``ContextParallelModel``: ``out = cp_model(input_ids=..., labels=...)``;
        ``out.loss`` is the whole batch's loss; gradients are to be averaged over ``mesh``
        (DDP / FSDP over those ranks, or ``cp_model.average_gradients()``);
        ``cp_model.gather(out.logits)`` gives the whole sequence's logits.

    Example:
        >>> mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("cp",))
        >>> cp = context_parallel(model, mesh, "causal & sliding(1024)")
        >>> cp(input_ids=ids, labels=ids).loss.backward(); cp.average_gradients()
    """
    group = _group_of(mesh)
    world = dist.get_world_size(group)
    if sharding is None:
        texts = [str(pattern or "dense")] + [str(p) for p in dict(
            options.get("assign") or {}).values()]
        kinds = {default_sharding(text, world).kind for text in texts}
        sharding = "contiguous" if kinds == {"contiguous"} else "zigzag"
    layout = Sharding(sharding, world)
    if pattern is not None:
        exchange_plan(str(_as_text(pattern)), layout.world * layout.chunks_per_rank * 64,
                      layout)  # a dynamic pattern fails here, before any compilation
    return ContextParallelModel(model, group, layout, pattern, seq_dim, options)


def _as_text(pattern: Any) -> str:
    from sparse_compile.fx.choose import as_pattern

    return str(as_pattern(pattern))
