"""A tiny transformers Llama (2 layers, hidden 64, GQA) and its batch, the same on every rank."""

from __future__ import annotations

import torch

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 64


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """``LlamaForCausalLM`` from a config (nothing downloaded), in eval mode (no dropout)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=1024)
    return transformers.LlamaForCausalLM(cfg).eval()


def token_batch(rows: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def gradients(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters' gradients (full tensors: FSDP2's sharded ones are gathered)."""
    grads = []
    for p in model.parameters():
        g = p.grad
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()
        grads.append(g.detach().clone())
    return grads


def worst_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest relative error over a list of gradients."""
    assert len(got) == len(want) and got
    return max(((a - b).norm() / b.norm().clamp_min(1e-30)).item()
               for a, b in zip(got, want, strict=True))
