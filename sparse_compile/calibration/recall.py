"""How much of the model's softmax mass each candidate pattern keeps, measured blockwise.

For one attention call the model computes ``P = softmax(scale · Q Kᵀ + bias + where(allowed,
0, −inf))`` (``allowed`` is the mask the backend folded out of the model, ``dense`` or
``causal``). A candidate pattern ``c`` keeps, in query row ``i``, the mass
``Σ_k P[i, k] · keep_c(i, k)``: 1 when it drops nothing the model attends to. Queries are taken
in chunks so that no more than ``max_scores`` score entries exist at once: the ``Lq × Lk``
matrix is never built for long inputs. The same pass returns the attention output, so the
model runs on exactly what it computes without the instrumentation.

Besides the sum and the minimum over rows, every row's kept mass is counted in a histogram
(``RECALL_BINS`` bins of width ``1 / RECALL_BINS`` and one for rows that keep everything), from
which low quantiles of the per-row recall are read without storing the rows.

Rows the model masks entirely (every key dropped, or pushed to the additive mask's
``finfo.min``, as padding queries are) carry no information about the heads and are not
counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sparse_compile.fallback import bias_as_4d
from sparse_compile.patterns import Pattern, dense

# Score entries (over batch, heads and one chunk of rows) held at once.
DEFAULT_MAX_SCORES = 1 << 23
# Rounding of float32 softmax sums: a pattern that keeps every allowed key measures 1 − 1e-7.
TOLERANCE = 1e-6
# Bins of the per-row recall histogram: [i / RECALL_BINS, (i + 1) / RECALL_BINS) for
# i < RECALL_BINS, then one bin for rows keeping at least 1 − TOLERANCE (8 kB per head and
# candidate in int64).
RECALL_BINS = 1000


@dataclass
class KeptMass:
    """Kept mass per query head and candidate, accumulated over the counted rows.

    ``total``: float64 ``[H, C]``, the kept mass summed over rows; ``rows``: int64 ``[H]``, how
    many rows were counted (every batch element and every call); ``lowest``: float64
    ``[H, C]``, the smallest kept mass of any counted row (``inf`` while none was counted);
    ``histogram``: int64 ``[H, C, RECALL_BINS + 1]``, how many rows fell in each bin of kept
    mass (see :func:`recall_bins`).
    """

    total: torch.Tensor
    rows: torch.Tensor
    lowest: torch.Tensor
    histogram: torch.Tensor

    @classmethod
    def empty(cls, heads: int, candidates: int) -> KeptMass:
        zeros = torch.zeros(heads, candidates, dtype=torch.float64)
        return cls(zeros, torch.zeros(heads, dtype=torch.int64), torch.full_like(zeros, math.inf),
                   torch.zeros(heads, candidates, RECALL_BINS + 1, dtype=torch.int64))

    @property
    def heads(self) -> int:
        return self.total.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        """float64 ``[H, C]``: the mean kept mass over counted rows (NaN for a head with none)."""
        return self.total / self.rows[:, None].to(torch.float64)

    @property
    def minimum(self) -> torch.Tensor:
        """float64 ``[H, C]``: the smallest kept mass of a row (NaN for a head with none)."""
        return torch.where(self.rows[:, None] > 0, self.lowest, math.nan)

    def quantile(self, q: float) -> torch.Tensor:
        """float64 ``[H, C]``: the ``q``-quantile of the per-row kept mass, from the histogram
        (see :func:`histogram_quantile`)."""
        return histogram_quantile(self.histogram, q)

    def add(self, other: KeptMass) -> None:
        """Accumulate ``other`` (same heads and candidates) into this tally."""
        self.total += other.total
        self.rows += other.rows
        torch.minimum(self.lowest, other.lowest, out=self.lowest)
        self.histogram += other.histogram

    def pooled(self) -> KeptMass:
        """All heads counted as one (``H = 1``)."""
        return KeptMass(self.total.sum(0, keepdim=True), self.rows.sum(0, keepdim=True),
                        self.lowest.amin(0, keepdim=True), self.histogram.sum(0, keepdim=True))


def recall_bins(kept: torch.Tensor) -> torch.Tensor:
    """int64 bin index of each kept mass: ``floor((kept + TOLERANCE) · RECALL_BINS)`` clamped to
    ``[0, RECALL_BINS − 1]``, and ``RECALL_BINS`` where ``kept ≥ 1 − TOLERANCE`` (the row keeps
    everything up to float32 rounding). Bin ``i`` stands for the recall ``i / RECALL_BINS``,
    at most ``1 / RECALL_BINS`` below the row's own figure and never more than ``TOLERANCE``
    above it."""
    scaled = torch.floor((kept.to(torch.float64) + TOLERANCE) * RECALL_BINS)
    index = scaled.clamp(0, RECALL_BINS - 1).to(torch.int64)
    return torch.where(kept >= 1.0 - TOLERANCE, RECALL_BINS, index)


def histogram_quantile(histogram: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-quantile of per-row recall from ``histogram [..., RECALL_BINS + 1]``: the
    recall of bin ``i`` holding the row of rank ``floor(q · n) + 1`` (ascending, counting from
    1, ``n`` rows), so it reaches a target ``t`` exactly when at most ``q · n`` rows keep less
    than ``t`` (at the histogram's resolution). float64 ``[...]``; NaN where ``n = 0``."""
    counts = histogram.cumsum(-1)
    n = counts[..., -1]
    rank = torch.floor(n.to(torch.float64) * q + 1e-9).to(torch.int64) + 1
    index = (counts < rank[..., None]).sum(-1).clamp(max=RECALL_BINS)
    return torch.where(n > 0, index.to(torch.float64) / RECALL_BINS, math.nan)


def _row_histogram(kept: torch.Tensor, counted: torch.Tensor, hkv: int,
                   group: int) -> torch.Tensor:
    """int64 ``[Hq, RECALL_BINS + 1]``: the counted rows of ``kept [B, Hkv, G, c]`` binned by
    query head."""
    heads = torch.arange(hkv * group, device=kept.device).reshape(1, hkv, group, 1)
    flat = (heads * (RECALL_BINS + 1) + recall_bins(kept))[counted]
    return torch.bincount(flat.cpu(), minlength=hkv * group * (RECALL_BINS + 1)).reshape(
        hkv * group, RECALL_BINS + 1)


def _keep_rows(pattern: Pattern, q_abs: torch.Tensor, lk: int, hq: int) -> torch.Tensor:
    """``keep`` for absolute query positions ``q_abs [c]``: ``[c, Lk]``, or ``[Hq, c, Lk]``
    for a per-head pattern (query head ``h`` uses ``pattern.for_head(h)``)."""
    keys = torch.arange(lk, dtype=torch.int64, device=q_abs.device)
    if pattern.per_head:
        h = torch.arange(hq, dtype=torch.int64, device=q_abs.device)
        return pattern.evaluate(q_abs[None, :, None], keys[None, None, :], h[:, None, None])
    return pattern.evaluate(q_abs[:, None], keys[None, :])


def _grouped(keep: torch.Tensor, hkv: int, group: int) -> torch.Tensor:
    """A keep-mask ``[c, Lk]`` or ``[Hq, c, Lk]`` broadcastable to ``[B, Hkv, G, c, Lk]``."""
    if keep.dim() == 3:
        return keep.reshape(hkv, group, *keep.shape[1:])
    return keep


def _masked_by_bias(bias: torch.Tensor) -> torch.Tensor:
    """Where an additive mask removes an entry: ``-inf``, or the ``finfo.min`` convention."""
    return bias <= torch.finfo(bias.dtype).min / 2


def attend_and_measure(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    candidates: Sequence[Pattern],
    allowed: Pattern = dense,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    softcap: float = 0.0,
    max_scores: int = DEFAULT_MAX_SCORES,
) -> tuple[torch.Tensor, KeptMass]:
    """The model's attention output and the softmax mass each candidate keeps.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``, v: ``[B, Hkv, Lk, Dv]``, ``Hq`` a multiple
            of ``Hkv`` (query head ``h`` reads kv head ``h // (Hq // Hkv)``).
        candidates: static patterns; query ``i`` sits at absolute position ``i + Lk − Lq``.
        allowed: the mask the model applies as a pattern (what the backend folded out of it).
        scale: logit scale, default ``1 / sqrt(D)``.
        bias: bool keep-mask or additive float tensor broadcastable to ``[B, Hq, Lq, Lk]``.
        softcap: when > 0, logits are ``softcap · tanh(scale · q·k / softcap)`` before the bias.
        max_scores: bound on the score entries (``B · Hq · rows · Lk``) held at once.

    Returns:
        ``(out, mass)``: ``out [B, Hq, Lq, Dv]`` in q's dtype, the dense attention (rows with no
        allowed key are zero); ``mass`` a :class:`KeptMass` with ``H = Hq`` and one column per
        candidate, over the rows of this call. Computed in float32 (float64 for float64 q).
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(dtype).reshape(b, hkv, group, lq, d)
    kg, vg = k.to(dtype).unsqueeze(2), v.to(dtype).unsqueeze(2)
    bias5 = _bias_5d(bias, hkv, group)
    mass = KeptMass.empty(hq, len(candidates))
    outs = []
    chunk = max(1, min(lq, max_scores // max(1, b * hq * lk)))
    for start in range(0, lq, chunk):
        stop = min(lq, start + chunk)
        q_abs = torch.arange(start, stop, dtype=torch.int64, device=q.device) + (lk - lq)
        bias_rows = None
        if bias5 is not None:
            bias_rows = bias5 if bias5.shape[3] == 1 else bias5[:, :, :, start:stop]
        probs, counted = _probabilities(qg[:, :, :, start:stop], kg, q_abs, allowed, scale,
                                        bias_rows, softcap, hq)
        outs.append(probs @ vg)
        counted = counted.expand(b, hkv, group, stop - start)
        rows = counted.sum((0, 3)).reshape(hq)
        total = torch.empty(hq, len(candidates), dtype=torch.float64)
        lowest = torch.empty_like(total)
        histogram = torch.empty(hq, len(candidates), RECALL_BINS + 1, dtype=torch.int64)
        for j, candidate in enumerate(candidates):
            keep = _grouped(_keep_rows(candidate, q_abs, lk, hq), hkv, group)
            kept = (probs * keep).sum(-1)  # [B, Hkv, G, c]
            total[:, j] = torch.where(counted, kept, 0.0).sum((0, 3)).reshape(hq).cpu()
            lowest[:, j] = torch.where(counted, kept, math.inf).amin((0, 3)).reshape(hq).cpu()
            histogram[:, j] = _row_histogram(kept, counted, hkv, group)
        mass.add(KeptMass(total, rows.cpu(), lowest, histogram))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=3)
    return out.reshape(b, hq, lq, -1).to(q.dtype), mass


def _bias_5d(bias: torch.Tensor | None, hkv: int, group: int) -> torch.Tensor | None:
    """``bias`` broadcastable to ``[B, Hq, Lq, Lk]`` as ``[B|1, Hkv|1, G|1, Lq|1, Lk|1]``."""
    bias4 = bias_as_4d(bias)
    if bias4 is None:
        return None
    if bias4.shape[1] == 1:
        return bias4.unsqueeze(2)
    return bias4.reshape(bias4.shape[0], hkv, group, *bias4.shape[2:])


def _probabilities(
    q: torch.Tensor,
    k: torch.Tensor,
    q_abs: torch.Tensor,
    allowed: Pattern,
    scale: float,
    bias: torch.Tensor | None,
    softcap: float,
    hq: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities of one chunk of rows and which rows count.

    q ``[B, Hkv, G, c, D]``, k ``[B, Hkv, 1, Lk, D]``, bias broadcastable to
    ``[B, Hkv, G, c, Lk]``. Returns probs ``[B, Hkv, G, c, Lk]`` (zero rows where nothing is
    allowed) and a bool ``counted`` broadcastable to ``[B, Hkv, G, c]``: the rows in which the
    model attends to at least one key.
    """
    hkv, group, lk = q.shape[1], q.shape[2], k.shape[3]
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    keep = None if allowed == dense else _grouped(_keep_rows(allowed, q_abs, lk, hq), hkv, group)
    attended = keep
    if bias is not None:
        if bias.dtype == torch.bool:
            keep = bias if keep is None else keep & bias
            attended = keep
        else:
            s = s + bias.to(s.dtype)
            unmasked = ~_masked_by_bias(bias)
            attended = unmasked if keep is None else keep & unmasked
    if keep is not None:
        s = s.masked_fill(~keep, -math.inf)
    row_max = s.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    weights = torch.exp(s - row_max)
    denom = weights.sum(-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, 1.0)
    if attended is None:
        counted = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=q.device)
    else:
        counted = attended.any(-1)
        counted = counted.reshape((1,) * (4 - counted.dim()) + tuple(counted.shape))
    return probs, counted
