"""The built-in base model: a tiny Llama built from a config with a fixed seed.

It exists so the whole pipeline (train, merge, GGUF export, eval) runs anywhere
without downloading weights. Shape: hidden 128, 4 layers, 4 query / 2 key-value
heads (grouped-query attention, so the kernels' GQA paths are exercised), SwiGLU
MLP 384 wide, untied lm_head; about 0.9M parameters with the built-in tokenizer.

The lm_head is re-initialised wider than HF's default (std 0.02). LoRA leaves the
final RMSNorm (weight 1) and lm_head frozen, so the largest logit the adapter can
ever produce is |lm_head row| x |normed hidden| = 0.02 * 128 = 2.6: with a vocab of
~500 the target token can never pass a few percent probability, and training
stalls. With std ``LM_HEAD_STD`` the ceiling is about 20. Measured on the CPU
with the default LoRA run (r 16, lr 2e-3, batch 16): std 0.02 left the loss at 4.9
after 300 steps (held-out accuracy 0.11); std 0.15 reached 0.62 after 300 steps
and 0.02 after 800 (accuracy 0.99-1.0). Widening the head costs no time (unlike
pretraining the base), keeps the adapter a pure LoRA (no modules_to_save for
export to carry), and leaves the untrained base at chance (0.0).
"""
from __future__ import annotations

import os
from pathlib import Path

from workbench import atomic

BUILTIN_MODEL = "builtin:tiny-llama"
SEED = 1234
LM_HEAD_STD = 0.15
ARCH = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def build_model(tokenizer):
    """The untrained tiny Llama for ``tokenizer`` (its vocab size and special ids),
    identical for identical tokenizers."""
    from workbench.offline import enforce_offline

    enforce_offline()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        dtype="float32",
        **ARCH,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
        torch.nn.init.normal_(model.lm_head.weight, std=LM_HEAD_STD)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def write_base(tokenizer, path: str | os.PathLike) -> Path:
    """Build the default base and save it (config.json + model.safetensors) to
    ``path`` via a temp folder and rename, so a killed run leaves no half base."""
    with atomic.directory(path) as tmp:
        build_model(tokenizer).save_pretrained(tmp, safe_serialization=True)
    return Path(path)
