"""A zoo of attention formulations written the way real models write them.

Each entry is an ``nn.Module`` mapping ``x [B, L, C]`` to ``[B, L, C]`` with exactly
``sites`` attention computations; its docstring names the model whose code it imitates.
Sizes are tiny (B=2, L=8, C=16) so that the suite runs quickly through the Triton interpreter.
Entries with ``softmax_written_out = True`` compute the softmax with ``exp`` themselves: the
oracle then masks ``exp`` too (``pattern_by_hand(..., exp=True)``).
``LOOKALIKES`` are modules that must not be rewritten.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

B, L, C = 2, 8, 16


class Entry(nn.Module):
    """Base: ``heads`` query heads of size ``C // heads``; ``sites`` attentions per call."""

    sites = 1

    def __init__(self, heads: int = 2, kv_heads: int | None = None) -> None:
        super().__init__()
        self.h = heads
        self.hkv = kv_heads or heads
        self.d = C // heads
        self.q_proj = nn.Linear(C, self.h * self.d)
        self.k_proj = nn.Linear(C, self.hkv * self.d)
        self.v_proj = nn.Linear(C, self.hkv * self.d)
        self.o_proj = nn.Linear(self.h * self.d, C)

    def split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """[B, L, heads*d] -> [B, heads, L, d]."""
        return x.view(x.shape[0], x.shape[1], heads, self.d).transpose(1, 2)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.split(self.q_proj(x), self.h), self.split(self.k_proj(x), self.hkv),
                self.split(self.v_proj(x), self.hkv))

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        """[B, H, L, d] -> [B, L, C] through the output projection."""
        return self.o_proj(o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(B, L, C)


def _causal(n: int) -> torch.Tensor:
    return torch.tril(torch.ones(n, n, dtype=torch.bool))


class GPT2Legacy(Entry):
    """GPT-2 (transformers 4.x ``GPT2Attention._attn``): fused c_attn, division by a
    ``torch.full`` scalar, ``torch.where`` causal mask with a finfo.min tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(C, 3 * C)
        self.register_buffer("bias", _causal(L).view(1, 1, L, L), persistent=False)
        self.attn_dropout = nn.Dropout(0.0)

    def forward(self, x):
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = self.split(q, self.h), self.split(k, self.h), self.split(v, self.h)
        w = torch.matmul(q, k.transpose(-1, -2))
        w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype, device=w.device)
        n = q.size(-2)
        causal = self.bias[:, :, :n, :n]
        mask_value = torch.full([], torch.finfo(w.dtype).min, dtype=w.dtype, device=w.device)
        w = torch.where(causal, w.to(w.dtype), mask_value)
        w = nn.functional.softmax(w, dim=-1)
        w = self.attn_dropout(w.type(v.dtype))
        return self.merge(torch.matmul(w, v))


class BertSelf(Entry):
    """BERT (``BertSelfAttention``, transformers 4.x): transpose_for_scores, ``/ math.sqrt``,
    additive extended padding mask ``(1 - mask) * -10000``, ``nn.Softmax`` module."""

    def __init__(self) -> None:
        super().__init__()
        self.softmax = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(0.0)
        keep = torch.ones(B, L)
        keep[1, -1] = 0
        self.register_buffer("attention_mask", keep, persistent=False)

    def forward(self, x):
        q, k, v = self.qkv(x)
        scores = torch.matmul(q, k.transpose(-1, -2))
        scores = scores / math.sqrt(self.d)
        extended = (1.0 - self.attention_mask[:, None, None, :]) * -10000.0
        scores = scores + extended
        probs = self.dropout(self.softmax(scores)) if self.training else self.softmax(scores)
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return self.o_proj(ctx.view(x.shape[0], x.shape[1], C))


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' ``repeat_kv``: [B, Hkv, L, D] -> [B, Hkv*n_rep, L, D]."""
    b, h, n, d = x.shape
    if n_rep == 1:
        return x
    x = x[:, :, None, :, :].expand(b, h, n_rep, n, d)
    return x.reshape(b, h * n_rep, n, d)


class LlamaEager(Entry):
    """Llama (transformers ``eager_attention_forward``): GQA through ``repeat_kv``, ``*
    scaling``, additive finfo.min causal mask, softmax in float32 cast back, dropout."""

    def __init__(self) -> None:
        super().__init__(heads=4, kv_heads=2)
        self.scaling = self.d ** -0.5

    def forward(self, x):
        q, k, v = self.qkv(x)
        k, v = repeat_kv(k, self.h // self.hkv), repeat_kv(v, self.h // self.hkv)
        w = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        n = x.shape[1]
        mask = torch.full((n, n), torch.finfo(x.dtype).min).triu(1)[None, None]
        w = w + mask
        w = nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        w = nn.functional.dropout(w, p=0.0, training=self.training)
        return self.merge(torch.matmul(w, v))


class MistralInterleave(Entry):
    """Mistral-style GQA written with ``repeat_interleave`` (as in several ports), boolean
    causal mask through ``masked_fill(-inf)``."""

    def __init__(self) -> None:
        super().__init__(heads=4, kv_heads=2)

    def forward(self, x):
        q, k, v = self.qkv(x)
        k = k.repeat_interleave(2, dim=1)
        v = v.repeat_interleave(2, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d)
        n = x.shape[1]
        future = torch.ones(n, n, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        return self.merge(torch.softmax(scores, dim=-1) @ v)


class T5Relative(Entry):
    """T5 (``T5Attention``): no scaling, learned relative position bias added with ``+=``,
    ``softmax(scores.float()).type_as(scores)``."""

    def __init__(self) -> None:
        super().__init__()
        self.relative_attention_bias = nn.Embedding(2 * L - 1, self.h)

    def position_bias(self, n: int) -> torch.Tensor:
        pos = torch.arange(n)
        buckets = pos[None, :] - pos[:, None] + L - 1
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x):
        q, k, v = self.qkv(x)
        scores = torch.matmul(q, k.transpose(3, 2))
        scores += self.position_bias(x.shape[1])
        w = nn.functional.softmax(scores.float(), dim=-1).type_as(scores)
        return self.merge(torch.matmul(w, v))


class BloomAlibi(Entry):
    """BLOOM (``BloomAttention``): 3-D ``alibi.baddbmm(q, kᵀ, beta, alpha)``, view to 4-D,
    additive mask, fp32 softmax, view back to 3-D and ``torch.bmm`` with values."""

    def __init__(self) -> None:
        super().__init__()
        slopes = torch.tensor([2.0 ** -(8 * (i + 1) / self.h) for i in range(self.h)])
        self.register_buffer("slopes", slopes, persistent=False)
        self.inv_norm_factor = 1.0 / math.sqrt(self.d)

    without_alibi = False

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.reshape(b * self.h, n, self.d)
        k = k.reshape(b * self.h, n, self.d).transpose(-1, -2)
        v = v.reshape(b * self.h, n, self.d)
        alibi = (self.slopes[:, None] * torch.arange(n)[None, :]).repeat(b, 1)[:, None, :]
        if self.without_alibi:
            w = (torch.bmm(q, k) * self.inv_norm_factor).view(b, self.h, n, -1)
        else:
            scores = alibi.baddbmm(batch1=q, batch2=k, beta=1.0, alpha=self.inv_norm_factor)
            w = scores.view(b, self.h, n, -1)
        w = w + torch.full((n, n), torch.finfo(x.dtype).min).triu(1)
        probs = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = probs.view(b * self.h, n, -1)
        ctx = torch.bmm(probs, v).view(b, self.h, n, self.d)
        return self.merge(ctx)


class Bmm3dThenView(BloomAlibi):
    """Megatron-style: 3-D ``torch.bmm`` scaled by a number, viewed to 4-D, then the additive
    mask (the scale comes before the view, the bias after it)."""

    without_alibi = True


class NeoXLegacy(Entry):
    """GPT-NeoX (transformers 4.3x ``_attn``): q and k upcast to float32 before the product,
    ``torch.where`` causal mask with a ``torch.tensor`` fill, result cast to v's dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.norm_factor = math.sqrt(self.d)
        self.register_buffer("causal", _causal(L)[None, None], persistent=False)

    def forward(self, x):
        q, k, v = self.qkv(x)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / self.norm_factor
        mask_value = torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype)
        scores = torch.where(self.causal, scores, mask_value)
        w = nn.functional.softmax(scores, dim=-1).to(v.dtype)
        return self.merge(torch.matmul(w, v))


class ViTSelf(Entry):
    """ViT (``ViTSelfAttention`` eager): plain scaled scores, softmax, dropout, no mask."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        q, k, v = self.qkv(x)
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.d)
        return self.merge(torch.matmul(self.dropout(nn.functional.softmax(s, dim=-1)), v))


class WhisperCross(Entry):
    """Whisper (``WhisperAttention`` cross-attention): q scaled before the product, keys and
    values from encoder states of another length (Lq = 4 < Lk = 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.scaling = self.d ** -0.5
        self.encoder = nn.Parameter(torch.randn(B, L, C))

    def forward(self, x):
        x = x[:, : L // 2]
        q = self.split(self.q_proj(x) * self.scaling, self.h)
        k = self.split(self.k_proj(self.encoder), self.h)
        v = self.split(self.v_proj(self.encoder), self.h)
        w = nn.functional.softmax(torch.matmul(q, k.transpose(2, 3)), dim=-1)
        out = self.merge(torch.matmul(w, v))
        return torch.cat([out, out], dim=1)


class EinsumHeadsFirst(Entry):
    """lucidrains-style (e.g. ``x-transformers``, Perceiver): ``einsum('b h i d, b h j d ->
    b h i j')``, scale applied to q, einsum with values."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        q = q * self.d ** -0.5
        sim = torch.einsum("b h i d, b h j d -> b h i j", q, k)
        attn = sim.softmax(dim=-1)
        return self.merge(torch.einsum("b h i j, b h j d -> b h i d", attn, v))


class EinsumSeqFirst(Entry):
    """Heads after the sequence axis, as in Mesh-TensorFlow ports and ``GPT-J``-era JAX
    ports: ``einsum('bqhd,bkhd->bhqk')`` and ``einsum('bhqk,bkhd->bqhd')``."""

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.h, self.d)
        k = self.k_proj(x).view(b, n, self.h, self.d)
        v = self.v_proj(x).view(b, n, self.h, self.d)
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.d)
        w = torch.softmax(logits, dim=-1)
        out = torch.einsum("bhqk,bkhd->bqhd", w, v)
        return self.o_proj(out.reshape(b, n, C))


class NanoGPTFlash(Entry):
    """nanoGPT (``CausalSelfAttention`` flash path): SDPA with ``is_causal=True``."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0,
                                           is_causal=True)
        return self.merge(y)


class LlamaSdpa(Entry):
    """Llama (transformers ``sdpa_attention_forward`` with a padding mask): SDPA with a
    boolean mask, explicit ``scale`` and ``enable_gqa=True``."""

    def __init__(self) -> None:
        super().__init__(heads=4, kv_heads=2)

    def forward(self, x):
        q, k, v = self.qkv(x)
        n = x.shape[1]
        keep = torch.ones(x.shape[0], 1, n, n, dtype=torch.bool).tril()
        keep[1, :, :, 0] = False
        keep[1, :, 0, 0] = True
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=self.d ** -0.5,
                                           enable_gqa=True)
        return self.merge(y)


class SdpaFloatMask(Entry):
    """HF ``sdpa_attention_forward`` for encoders (e.g. RoBERTa): SDPA with an additive float
    padding mask and GQA expanded by ``repeat_kv`` beforehand."""

    def __init__(self) -> None:
        super().__init__(heads=4, kv_heads=2)

    def forward(self, x):
        q, k, v = self.qkv(x)
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        mask = torch.zeros(x.shape[0], 1, 1, x.shape[1])
        mask[0, ..., -1] = torch.finfo(x.dtype).min
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


class TorchMHA(nn.Module):
    """PyTorch ``nn.MultiheadAttention`` with ``need_weights=False`` and a causal
    ``attn_mask``, as in ``nn.TransformerEncoderLayer`` and CLIP-style code."""

    sites = 1

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(C, 2, batch_first=True)

    def forward(self, x):
        n = x.shape[1]
        future = torch.ones(n, n, dtype=torch.bool).triu(1)
        return self.mha(x, x, x, need_weights=False, attn_mask=future)[0]

    example_input = staticmethod(Entry.example_input)


class FairseqBmm(Entry):
    """fairseq (``MultiheadAttention``): 3-D ``[B·H, L, D]`` tensors, ``q *= scaling``,
    ``torch.bmm``, additive mask, ``softmax(float32).type_as``, bmm with values."""

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q_proj(x) * self.d ** -0.5
        q = q.view(b, n, self.h, self.d).transpose(1, 2).reshape(b * self.h, n, self.d)
        k = self.k_proj(x).view(b, n, self.h, self.d).transpose(1, 2).reshape(b * self.h, n,
                                                                              self.d)
        v = self.v_proj(x).view(b, n, self.h, self.d).transpose(1, 2).reshape(b * self.h, n,
                                                                              self.d)
        w = torch.bmm(q, k.transpose(1, 2))
        w = w + torch.zeros(n, n).masked_fill(_causal(n).logical_not(), float("-inf"))
        probs = F.softmax(w.float(), dim=-1).type_as(w)
        out = torch.bmm(probs, v).view(b, self.h, n, self.d)
        return self.merge(out)


class SwinV2Cosine(Entry):
    """Swin Transformer V2 (``WindowAttention``): cosine attention times a learned per-head
    ``logit_scale.exp()`` tensor, plus a learned relative position bias table."""

    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((self.h, 1, 1))))
        self.relative_position_bias = nn.Parameter(0.1 * torch.randn(self.h, L, L))

    def forward(self, x):
        q, k, v = self.qkv(x)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        attn = attn * logit_scale
        attn = attn + self.relative_position_bias.unsqueeze(0)
        attn = attn.softmax(dim=-1)
        return self.merge(attn @ v)


class MptAlibi(Entry):
    """MPT (``MultiheadAttention`` with ALiBi): 4-D bias ``[1, H, 1, Lk]`` added after
    scaling, causal ``masked_fill`` with finfo.min."""

    def __init__(self) -> None:
        super().__init__()
        slopes = torch.tensor([1.0 / 2 ** (i + 1) for i in range(self.h)])
        self.register_buffer("slopes", slopes.view(1, self.h, 1, 1), persistent=False)

    def forward(self, x):
        q, k, v = self.qkv(x)
        n = x.shape[1]
        w = q.matmul(k.transpose(-1, -2)) * (1 / math.sqrt(self.d))
        w = w + self.slopes * torch.arange(1 - n, 1).view(1, 1, 1, n)
        w = w.masked_fill(_causal(n).logical_not().view(1, 1, n, n), torch.finfo(w.dtype).min)
        return self.merge(torch.softmax(w, dim=-1).matmul(v))


class ClipPadding(Entry):
    """CLIP/BART-style key padding: ``masked_fill(pad[:, None, None, :], -inf)``."""

    def __init__(self) -> None:
        super().__init__()
        pad = torch.zeros(B, L, dtype=torch.bool)
        pad[0, -1] = True
        self.register_buffer("pad", pad, persistent=False)

    def forward(self, x):
        q, k, v = self.qkv(x)
        w = (q * self.d ** -0.5) @ k.transpose(-1, -2)
        w = w.masked_fill(self.pad[:, None, None, :], float("-inf"))
        return self.merge(w.softmax(-1) @ v)


class GuidedDiffusionQKV(Entry):
    """OpenAI guided-diffusion (``QKVAttentionLegacy``): ``[B·H, D, L]`` layout, scale split
    between q and k (``1 / sqrt(sqrt(ch))`` each), einsum ``bct,bcs->bts``."""

    def forward(self, x):
        b, n, _ = x.shape
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        qkv = qkv.transpose(1, 2).reshape(b * self.h, 3 * self.d, n)
        q, k, v = qkv.split(self.d, dim=1)
        scale = 1 / math.sqrt(math.sqrt(self.d))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = torch.einsum("bts,bcs->bct", weight, v)
        return self.o_proj(a.reshape(b, self.h * self.d, n).transpose(1, 2))


class TimmAttention(Entry):
    """timm ``Attention`` (non-fused path): qkv reshape/permute/unbind, ``q * scale``,
    ``attn.softmax(dim=-1)``, ``attn_drop`` module."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv_proj = nn.Linear(C, 3 * C)
        self.attn_drop = nn.Dropout(0.0)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv_proj(x).reshape(b, n, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.d ** -0.5
        attn = q @ k.transpose(-2, -1)
        attn = self.attn_drop(attn.softmax(dim=-1))
        return self.merge(attn @ v)


class KVCacheDecode(Entry):
    """Llama-style decoding with a KV cache (concatenated past keys, Lq = 8 < Lk = 12) and an
    additive mask aligned bottom-right."""

    def __init__(self) -> None:
        super().__init__()
        self.past_k = nn.Parameter(torch.randn(B, 2, 4, self.d))
        self.past_v = nn.Parameter(torch.randn(B, 2, 4, self.d))

    def forward(self, x):
        q, k, v = self.qkv(x)
        k = torch.cat([self.past_k, k], dim=2)
        v = torch.cat([self.past_v, v], dim=2)
        n, m = q.shape[2], k.shape[2]
        future = torch.ones(n, m, dtype=torch.bool).triu(m - n + 1)
        mask = torch.zeros(n, m).masked_fill(future, torch.finfo(x.dtype).min)
        w = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.d) + mask
        return self.merge(torch.matmul(F.softmax(w, dim=-1, dtype=torch.float32), v))


class FalconMQA(Entry):
    """Falcon-7B-style multi-query attention: one key/value head broadcast by matmul."""

    def __init__(self) -> None:
        super().__init__(heads=2, kv_heads=1)

    def forward(self, x):
        q, k, v = self.qkv(x)
        s = q @ k.transpose(-1, -2) * self.d ** -0.5
        n = x.shape[1]
        s = s + torch.zeros(n, n).masked_fill(_causal(n).logical_not(), float("-inf"))
        return self.merge(s.softmax(dim=-1) @ v)


class InPlaceMasking(Entry):
    """Older PyTorch code (e.g. the Annotated Transformer's ``attention`` with in-place
    ``masked_fill_``, Longformer-era ``div_``): scores updated in place."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        n = x.shape[1]
        scores = torch.matmul(q, k.transpose(-2, -1))
        scores.div_(math.sqrt(self.d))
        scores.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), -1e9)
        return self.merge(torch.matmul(F.softmax(scores, dim=-1), v))


class RowMaxShift(Entry):
    """CogView (PB-Relax) / hand-written stable softmax: the row maximum subtracted from the
    scores before the softmax, with and without ``detach``."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        s = q @ k.transpose(-1, -2) / math.sqrt(self.d)
        s = s - s.max(dim=-1, keepdim=True)[0].detach()
        s = s + torch.zeros(x.shape[1], x.shape[1]).masked_fill(
            _causal(x.shape[1]).logical_not(), float("-inf"))
        s = s - torch.amax(s, -1, keepdim=True)
        return self.merge(torch.softmax(s, dim=-1) @ v)


class TwoLayers(nn.Module):
    """Two stacked blocks (a Llama eager layer then a ViT layer): both sites found."""

    sites = 2

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([LlamaEager(), ViTSelf()])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x

    example_input = staticmethod(Entry.example_input)


class GemmaSoftcap(Entry):
    """Gemma 2 (``Gemma2Attention``): logit soft-capping ``tanh(s / cap) * cap`` after the scale
    and before the causal mask, in float32."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        s = torch.matmul(q, k.transpose(2, 3)) * self.d ** -0.5
        s = s / 2.0
        s = torch.tanh(s)
        s = s * 2.0
        s = s + torch.zeros(L, L).masked_fill(~_causal(L), torch.finfo(s.dtype).min)
        w = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.merge(torch.matmul(w, v))


class SoftmaxWrittenOut(Entry):
    """A softmax written out by hand, as in teaching code and in ports to runtimes without a
    softmax op: the row maximum subtracted (``amax``), ``.exp()``, division by the row sum over
    ``dim=-1``; a boolean causal mask filled with ``-inf`` before it."""

    softmax_written_out = True

    def forward(self, x):
        q, k, v = self.qkv(x)
        s = q @ k.transpose(-1, -2) * self.d ** -0.5
        s = s.masked_fill(~_causal(x.shape[1]), float("-inf"))
        a = s - s.amax(-1, keepdim=True)
        a = a.exp()
        a = a / a.sum(-1, keepdim=True)
        return self.merge(a @ v)


class SoftmaxWrittenOutFp32(Entry):
    """The same by hand in a Llama-style layer (GQA through ``repeat_kv``, additive finfo.min
    causal mask): fp32 upcast, ``max(dim=3, keepdim=True).values``, ``torch.exp``,
    multiplication by the sum's ``reciprocal()`` over the explicit last axis, cast back."""

    softmax_written_out = True

    def __init__(self) -> None:
        super().__init__(heads=4, kv_heads=2)

    def forward(self, x):
        q, k, v = self.qkv(x)
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        w = torch.matmul(q, k.transpose(2, 3)) * self.d ** -0.5
        n = x.shape[1]
        w = w + torch.full((n, n), torch.finfo(x.dtype).min).triu(1)[None, None]
        w = w.float()
        w = w - w.max(dim=3, keepdim=True).values
        w = torch.exp(w)
        w = w * w.sum(dim=3, keepdim=True).reciprocal()
        return self.merge(torch.matmul(w.to(q.dtype), v))


class SoftmaxWrittenOut3d(Entry):
    """fairseq-style 3-D ``[B·H, L, D]`` bmm with the softmax by hand: a detached
    ``torch.max(w, -1, keepdim=True)[0]``, ``torch.exp``, multiplication by ``1 / sum`` over
    the explicit last axis (2), an additive causal mask."""

    softmax_written_out = True

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.reshape(b * self.h, n, self.d) for t in self.qkv(x))
        w = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(self.d)
        w = w + torch.zeros(n, n).masked_fill(_causal(n).logical_not(), float("-inf"))
        e = torch.exp(w - torch.max(w, -1, keepdim=True)[0].detach())
        probs = e * (1 / torch.sum(e, dim=2, keepdim=True))
        return self.merge(torch.bmm(probs, v).view(b, self.h, n, self.d))


class SoftmaxWrittenOutUnshifted(Entry):
    """lucidrains-style einsum attention with the naive softmax by hand: ``exp`` of the scores
    without subtracting the maximum, division by ``torch.sum(..., dim=-1, keepdim=True)``."""

    softmax_written_out = True

    def forward(self, x):
        q, k, v = self.qkv(x)
        sim = torch.einsum("b h i d, b h j d -> b h i j", q, k) * self.d ** -0.5
        e = sim.exp()
        attn = e / torch.sum(e, dim=-1, keepdim=True)
        return self.merge(torch.einsum("b h i j, b h j d -> b h i d", attn, v))


class ExpLogSoftmax(Entry):
    """Attention probabilities taken back from log-probabilities, as code that also needs the
    log-weights (entropy terms, alignment losses) writes it: ``torch.exp(torch.log_softmax(s,
    -1))``, a T5-style learned relative bias added before."""

    def __init__(self) -> None:
        super().__init__()
        self.relative_attention_bias = nn.Parameter(0.1 * torch.randn(self.h, L, L))

    def forward(self, x):
        q, k, v = self.qkv(x)
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.d)
        s = s + self.relative_attention_bias
        return self.merge(torch.exp(torch.log_softmax(s, -1)) @ v)


class LogSoftmaxExpFp32(Entry):
    """``F.log_softmax(s.float(), dim=3).exp()`` over the explicit last axis, cast back with
    ``type_as``, a padding mask filled with ``-inf`` before it."""

    def __init__(self) -> None:
        super().__init__()
        pad = torch.zeros(B, L, dtype=torch.bool)
        pad[1, -2:] = True
        self.register_buffer("pad", pad, persistent=False)

    def forward(self, x):
        q, k, v = self.qkv(x)
        s = (q * self.d ** -0.5) @ k.transpose(-1, -2)
        s = s.masked_fill(self.pad[:, None, None, :], float("-inf"))
        w = F.log_softmax(s.float(), dim=3).exp().type_as(v)
        return self.merge(w @ v)


ZOO = [
    GPT2Legacy, BertSelf, LlamaEager, MistralInterleave, T5Relative, BloomAlibi, Bmm3dThenView,
    NeoXLegacy,
    ViTSelf, WhisperCross, EinsumHeadsFirst, EinsumSeqFirst, NanoGPTFlash, LlamaSdpa,
    SdpaFloatMask, TorchMHA, FairseqBmm, SwinV2Cosine, MptAlibi, ClipPadding,
    GuidedDiffusionQKV, TimmAttention, KVCacheDecode, FalconMQA, InPlaceMasking,
    RowMaxShift, TwoLayers, GemmaSoftcap, SoftmaxWrittenOut, SoftmaxWrittenOutFp32,
    SoftmaxWrittenOut3d, SoftmaxWrittenOutUnshifted, ExpLogSoftmax, LogSoftmaxExpFp32,
]


# --- look-alikes: must not be rewritten ----------------------------------------------------


class SoftmaxOverQueries(Entry):
    """Slot Attention (Locatello et al.): softmax over the query (slot) axis, not the keys."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        w = torch.softmax(q @ k.transpose(-1, -2), dim=-2)
        return self.merge(w @ v)


class LinearAttention(Entry):
    """Linear attention (Katharopoulos et al.): elu+1 feature maps, no softmax."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        kv = k.transpose(-1, -2) @ v
        z = 1 / (q @ k.sum(dim=2, keepdim=True).transpose(-1, -2) + 1e-6)
        return self.merge((q @ kv) * z)


class WeightsReturned(Entry):
    """``output_attentions=True``: the attention weights are returned with the output."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.d), dim=-1)
        return self.merge(w @ v), w


class TanhScores(Entry):
    """Bounded scores ``tanh(s)`` with no capping factor around it: not soft-capping, refused."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        s = torch.tanh(q @ k.transpose(-1, -2) * self.d ** -0.5)
        return self.merge(torch.softmax(s, dim=-1) @ v)


class SoftmaxClassifier(Entry):
    """A classifier head: softmax over class logits, then a weighted sum of prototypes."""

    def __init__(self) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(5, C))

    def forward(self, x):
        probs = torch.softmax(x @ self.prototypes.t(), dim=-1)
        return probs @ self.prototypes


class StableSoftmaxByHand(Entry):
    """Scores combined with a value computed from themselves (``s * s.mean()``): refused."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        s = q @ k.transpose(-1, -2)
        s = s * s.detach().mean(dim=-1, keepdim=True)
        return self.merge(torch.softmax(s, dim=-1) @ v)


class MHAWithWeights(TorchMHA):
    """``nn.MultiheadAttention`` with its default ``need_weights=True``: weights returned."""

    def forward(self, x):
        out, weights = self.mha(x, x, x)
        return out, weights


class ExpOverQueries(Entry):
    """Slot Attention with its softmax over the slots written by hand: the exp normalised over
    the query axis (``e / e.sum(-2, keepdim=True)``), not over the keys."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        e = (q @ k.transpose(-1, -2) * self.d ** -0.5).exp()
        return self.merge(e / e.sum(-2, keepdim=True) @ v)


class MaxOverQueries(Entry):
    """A softmax by hand over the keys whose "stable" shift is the maximum over the queries:
    ``exp(s - s.amax(-2, keepdim=True))`` divided by its sum over the keys is no softmax of
    ``s`` (the shift differs from key to key)."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        s = q @ k.transpose(-1, -2) * self.d ** -0.5
        e = (s - s.amax(-2, keepdim=True)).exp()
        return self.merge(e / e.sum(-1, keepdim=True) @ v)


class ReluNormalised(Entry):
    """ReLU attention normalised by its sum over the keys: a sum without the exp."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        w = F.relu(q @ k.transpose(-1, -2)) + 1e-6
        return self.merge(w / w.sum(-1, keepdim=True) @ v)


class SoftmaxOffByOne(Entry):
    """softmax₁ from "Attention Is Off By One": ``exp(s) / (1 + sum(exp(s)))`` lets a row
    attend to nothing; the extra 1 makes it no softmax."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        e = (q @ k.transpose(-1, -2) * self.d ** -0.5).exp()
        return self.merge(e / (1 + e.sum(-1, keepdim=True)) @ v)


# (module, how many candidate sites it reports) – each must be left as it is.
LOOKALIKES = [
    (SoftmaxOverQueries, 1), (LinearAttention, 0), (WeightsReturned, 1), (TanhScores, 1),
    (SoftmaxClassifier, None), (StableSoftmaxByHand, 1), (MHAWithWeights, None),
    (ExpOverQueries, 1), (MaxOverQueries, 1), (ReluNormalised, 1), (SoftmaxOffByOne, 1),
]
