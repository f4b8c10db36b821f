"""Small models for the calibration tests, each with an oracle that shares no code with
``sparse_compile``: it recomputes the attention probabilities in float64 from the model's own
weights and sums the kept mass by hand.

``AlibiPair`` computes two attentions in one module (a matmul/softmax one and an SDPA one),
with GQA, per-head ALiBi slopes (steep slopes make a head local, zero slopes leave it global;
the two sites use the slopes in opposite orders, so they choose differently) and an additive
causal + left-padding mask. ``by_hand`` patterns, when set, are added to each site's scores as
``where(keep, 0, -inf)``: the model with the chosen patterns applied by hand.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from sparse_compile.patterns import Pattern
from torch import nn

B, L, C, HEADS, KV_HEADS = 2, 16, 32, 4, 2
SLOPES = (3.0, 1.0, 0.0, 0.0)


def padding_mask(lengths: list[int], n: int) -> torch.Tensor:
    """bool ``[B, n]``: True on real tokens, left padding."""
    return torch.stack([torch.arange(n) >= n - m for m in lengths])


class AlibiPair(nn.Module):
    """Two attention sites in one module, over the same GQA projections."""

    def __init__(self) -> None:
        super().__init__()
        self.d = C // HEADS
        self.q_proj = nn.Linear(C, C)
        self.q2_proj = nn.Linear(C, C)
        self.k_proj = nn.Linear(C, KV_HEADS * self.d)
        self.v_proj = nn.Linear(C, KV_HEADS * self.d)
        self.o_proj = nn.Linear(2 * C, C)
        self.register_buffer("slopes", torch.tensor(SLOPES), persistent=False)
        self.by_hand: list[Pattern] | None = None

    def heads(self, x: torch.Tensor, count: int) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], count, self.d).transpose(1, 2)

    def bias(self, keep: torch.Tensor, slopes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[B, H, L, L]``: ALiBi ``−slope·(i − j)`` plus causal (−inf) and key padding
        (``finfo.min``, as transformers masks)."""
        n = keep.shape[1]
        distance = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).to(dtype)
        bias = -slopes.to(dtype)[:, None, None] * distance
        bias = bias.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
        padded = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
        return bias[None] + padded[:, None, None, :]

    def qkv(self, x: torch.Tensor):
        group = HEADS // KV_HEADS
        k = self.heads(self.k_proj(x), KV_HEADS).repeat_interleave(group, dim=1)
        v = self.heads(self.v_proj(x), KV_HEADS).repeat_interleave(group, dim=1)
        return self.heads(self.q_proj(x), HEADS), self.heads(self.q2_proj(x), HEADS), k, v

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q, q2, k, v = self.qkv(x)
        n = x.shape[1]
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d) + self.bias(keep, self.slopes,
                                                                         x.dtype)
        mask2 = self.bias(keep, self.slopes.flip(0), x.dtype)
        if self.by_hand is not None:
            scores = scores + _pattern_bias(self.by_hand[0], n, x)
            mask2 = mask2 + _pattern_bias(self.by_hand[1], n, x)
        first = torch.softmax(scores, dim=-1) @ v
        second = F.scaled_dot_product_attention(q2, k, v, attn_mask=mask2)
        out = torch.cat([first, second], dim=-1).transpose(1, 2).reshape(x.shape[0], n, -1)
        return self.o_proj(out)

    def probabilities(self, x: torch.Tensor, keep: torch.Tensor) -> list[torch.Tensor]:
        """The two sites' softmax probabilities ``[B, H, L, L]``, by hand (use float64)."""
        q, q2, k, _ = self.qkv(x)
        scale = 1 / math.sqrt(self.d)
        return [torch.softmax(qq @ k.transpose(-1, -2) * scale + self.bias(keep, s, x.dtype), -1)
                for qq, s in ((q, self.slopes), (q2, self.slopes.flip(0)))]


def _pattern_bias(pattern: Pattern, n: int, like: torch.Tensor) -> torch.Tensor:
    keep = pattern.mask(n, n, heads=HEADS if pattern.per_head else None)
    return torch.zeros(keep.shape, dtype=like.dtype).masked_fill(~keep, -math.inf)


class Stack(nn.Module):
    """Two ``AlibiPair`` layers with residuals."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([AlibiPair(), AlibiPair()])

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x, keep)
        return x

    def probabilities(self, x: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{assign key: probabilities [B, H, L, L]}`` of every site, in float64."""
        found = {}
        for i, layer in enumerate(self.layers):
            for j, probs in enumerate(layer.probabilities(x, keep)):
                found[f"layers.{i}#{j}"] = probs
            x = x + layer(x, keep)
        return found


def kept_mass(probs: torch.Tensor, pattern: Pattern, counted: torch.Tensor) -> torch.Tensor:
    """Per row, the mass ``pattern`` keeps: float64 ``[B, H, Lq]``; rows where ``counted``
    (bool ``[B, Lq]``) is False are NaN."""
    _, h, lq, lk = probs.shape
    keep = pattern.mask(lq, lk, heads=h if pattern.per_head else None)
    mass = (probs.to(torch.float64) * keep).sum(-1)
    return mass.masked_fill(~counted[:, None, :], math.nan)


def oracle_recall(probs: torch.Tensor, pattern: Pattern,
                  counted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``[H]`` mean and minimum over counted rows (every batch element) of the mass
    ``pattern`` keeps."""
    mass = kept_mass(probs, pattern, counted).transpose(0, 1).reshape(probs.shape[1], -1)
    valid = ~mass.isnan()
    mean = torch.where(valid, mass, 0.0).sum(1) / valid.sum(1)
    return mean, torch.where(valid, mass, math.inf).amin(1)


def oracle_quantile(probs: torch.Tensor, pattern: Pattern, counted: torch.Tensor,
                    q: float) -> torch.Tensor:
    """float64 ``[H]``: per head, the kept mass of the row of rank ``floor(q · n) + 1`` among
    the ``n`` counted rows sorted ascending (every batch element): the exact figure the
    histogram's quantile approximates."""
    mass = kept_mass(probs, pattern, counted).transpose(0, 1).reshape(probs.shape[1], -1)
    return torch.stack([exact_quantile(row[~row.isnan()], q) for row in mass])


def exact_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The value of rank ``floor(q · n) + 1`` (from 1) of ``values`` sorted ascending."""
    return values.sort().values[math.floor(q * values.numel() + 1e-9)]


def oracle_choice(rows: torch.Tensor, density: torch.Tensor, recall: float,
                  q: float) -> int | None:
    """Index of the sparsest candidate for which at most ``q · n`` of the ``n`` rows keep
    less than ``recall`` (``rows`` float64 ``[C, n]``, ``density`` ``[C]``), None if none."""
    ok = [j for j in range(rows.shape[0]) if (rows[j] < recall).sum() <= q * rows.shape[1]]
    return min(ok, key=lambda j: (float(density[j]), j)) if ok else None


def counted_rows(keep: torch.Tensor) -> torch.Tensor:
    """bool ``[B, L]``: causal rows that see at least one real key (left padding: the query
    rows before the first real token see none)."""
    n = keep.shape[1]
    return (keep[:, None, :] & torch.ones(n, n, dtype=torch.bool).tril()[None]).any(-1)
