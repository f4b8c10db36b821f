"""Tiny ``transformers`` models built from configs (no downloads) and their inputs.

``MODELS[name](attn_implementation)`` returns ``(model, inputs, attention_layers)``: the model
in eval mode (dropout off), a dict of inputs, and how many attention computations one forward
runs (self-attention and cross-attention layers counted separately). Models with grouped
keys keep 4 query heads over 2 KV heads (a query head's KV head is then not trivially 0);
the others have 2 heads, which halves the interpreter's programs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

transformers = __import__("pytest").importorskip("transformers")

SEQ = 8
LAYERS = 2


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model's output (a ``ModelOutput`` or a tuple)."""
    return out.logits if hasattr(out, "logits") else out[0]


def training_step(model: Any, inputs: dict, compiled: Any = None) -> tuple[torch.Tensor, list]:
    """Logits and parameter gradients of one step of ``compiled`` (default: ``model`` itself).

    The loss weights every logit differently so that no gradient cancels; gradients are
    cleared afterwards so that steps can be compared one after another.
    """
    out = logits_of((model if compiled is None else compiled)(**inputs))
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _ids(vocab: int, n: int = SEQ) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(0))


def _finish(model: Any, impl: str) -> Any:
    model.set_attn_implementation(impl)
    return model.eval()


def llama(impl: str):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=LAYERS, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    return _finish(transformers.LlamaForCausalLM(cfg), impl), {"input_ids": _ids(64)}, LAYERS


def mistral(impl: str):
    cfg = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=LAYERS, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=64,
                                     sliding_window=None)
    return _finish(transformers.MistralForCausalLM(cfg), impl), {"input_ids": _ids(64)}, LAYERS


def qwen2(impl: str):
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=LAYERS, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    return _finish(transformers.Qwen2ForCausalLM(cfg), impl), {"input_ids": _ids(64)}, LAYERS


def gpt2(impl: str):
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=LAYERS, n_head=2,
                                  n_positions=64)
    return _finish(transformers.GPT2LMHeadModel(cfg), impl), {"input_ids": _ids(64)}, LAYERS


def bert(impl: str):
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=LAYERS,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=64)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, -1] = 0
    inputs = {"input_ids": _ids(64), "attention_mask": mask}
    return _finish(transformers.BertForMaskedLM(cfg), impl), inputs, LAYERS


def vit(impl: str):
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32,
                                 num_hidden_layers=LAYERS, num_attention_heads=2,
                                 intermediate_size=64, num_labels=3)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model = transformers.ViTForImageClassification(cfg)
    return _finish(model, impl), {"pixel_values": pixels}, LAYERS


def t5(impl: str):
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=LAYERS,
                                num_decoder_layers=LAYERS, num_heads=2,
                                relative_attention_num_buckets=8, decoder_start_token_id=0)
    inputs = {"input_ids": _ids(64), "decoder_input_ids": _ids(64, SEQ // 2)}
    # encoder self, decoder self, decoder cross
    return _finish(transformers.T5ForConditionalGeneration(cfg), impl), inputs, 3 * LAYERS


def whisper(impl: str):
    cfg = transformers.WhisperConfig(vocab_size=64, num_mel_bins=8, d_model=32,
                                     encoder_layers=LAYERS, decoder_layers=LAYERS,
                                     encoder_attention_heads=2, decoder_attention_heads=2,
                                     encoder_ffn_dim=64, decoder_ffn_dim=64,
                                     max_source_positions=8, max_target_positions=16,
                                     decoder_start_token_id=0, pad_token_id=0)
    features = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
    inputs = {"input_features": features, "decoder_input_ids": _ids(64, 4)}
    model = transformers.WhisperForConditionalGeneration(cfg)
    return _finish(model, impl), inputs, 3 * LAYERS


def gpt_neox(impl: str):
    cfg = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=LAYERS,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64)
    return _finish(transformers.GPTNeoXForCausalLM(cfg), impl), {"input_ids": _ids(64)}, LAYERS


def bloom(impl: str):
    cfg = transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=LAYERS, n_head=2)
    return _finish(transformers.BloomForCausalLM(cfg), impl), {"input_ids": _ids(64)}, LAYERS


def gemma2(impl: str):
    """Gemma 2, logit soft-capping strong enough (cap 0.5, large weights) to matter here."""
    cfg = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=LAYERS, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                                    attn_logit_softcapping=0.5, sliding_window=4,
                                    initializer_range=0.5)
    return _finish(transformers.Gemma2ForCausalLM(cfg), impl), {"input_ids": _ids(64)}, LAYERS


MODELS: dict[str, Callable[[str], tuple[Any, dict[str, torch.Tensor], int]]] = {
    "llama": llama, "mistral": mistral, "qwen2": qwen2, "gpt2": gpt2, "bert": bert,
    "vit": vit, "t5": t5, "whisper": whisper, "gpt_neox": gpt_neox, "bloom": bloom,
}
