"""The built-in base models: small Llamas built from a config with a fixed seed.

They exist so the whole pipeline (train, merge, GGUF export, eval) runs anywhere
without downloading weights. Both use grouped-query attention (so the kernels' GQA
paths are exercised), a SwiGLU MLP and an untied lm_head; :data:`BUILTIN_MODELS`
maps the ``model.path`` names to their shapes:

* ``builtin:tiny-llama`` (the default; :data:`ARCH`): hidden 256, 4 layers, 4 query /
  2 key-value heads (head_dim 64), MLP 768 wide; 3.4M parameters with the built-in
  tokenizer (3,418,368). Every matrix's row length (its input dim) is a multiple of 256,
  the only rows llama.cpp's k-quants take, so the main job's q4_k_m GGUF is real
  Q4_K/Q6_K (issue 21). Trains the default run (800 steps) in about a minute on a
  2-core CPU: loss 0.020, held-out accuracy 0.000 -> 0.994 (seed 0, fp32).
* ``builtin:small-llama`` (:data:`SMALL_ARCH`): hidden 512, 6 layers, 8 query / 2
  key-value heads (head_dim 64, as real Llamas; 4 query heads per kv head), MLP 1536
  wide, 512 positions; 18.6M parameters (18,635,264; 5.5x the tiny one). For the
  accuracy suite on a GPU (configs/accuracy-gpu.yaml), where the tiny one's shapes are
  too small to say much about the kernels.

The measurements below were made on the models' first shapes (tiny: hidden 128, MLP 384,
head_dim 32, 0.9M parameters; small: MLP 1408, 17.5M), before the rows were widened to
multiples of 256; the ceiling they chose is kept at the current widths (the tiny default
at hidden 256 and std 0.075 trains as its first shape did: loss 0.020 and accuracy 0.994
after 800 steps, against 0.028 and 0.994).

The lm_head is re-initialised wider than HF's default (std 0.02). LoRA leaves the
final RMSNorm (weight 1) and lm_head frozen, so the largest logit the adapter can
ever produce is |lm_head row| x |normed hidden| = (std sqrt(hidden)) x sqrt(hidden)
= std x hidden. For the tiny model's first shape at 0.02 that is 0.02 * 128 = 2.6: with
a vocab of ~500 the target token can never pass a few percent probability, and
training stalls. With std 0.15 the ceiling is about 20 (:data:`LOGIT_CEILING`, 19.2),
which ``LM_HEAD_STD`` (0.075 at hidden 256) keeps. Measured on the CPU with the
default LoRA run (r 16, lr 2e-3, batch 16) at hidden 128: std 0.02 left the loss at 4.9
after 300 steps (held-out accuracy 0.11); std 0.15 reached 0.62 after 300 steps and
0.02 after 800 (accuracy 0.99-1.0). Widening the head costs
no time (unlike pretraining the base), keeps the adapter a pure LoRA (no
modules_to_save for export to carry), and leaves the untrained base at chance (0.0).

Every built-in model gets std = LOGIT_CEILING / hidden, the same ceiling (0.0375 for
hidden 512). This keeps the tiny model's regime, not just "enough room": the untrained
base's logits have std (std sqrt(hidden)), 0.85 here, so it starts near uniform
(first-step loss 6.84, ln 528 = 6.27), and the adapter is trained towards the same
largest confidence on every built-in. Measured on the 2-core CPU with
configs/accuracy-gpu.yaml (kernels off, fp32; 1000 steps, lr 1e-3, batch 16; 156
held-out rows) for the small model:

    lm_head std             first loss  loss @ 400  final loss  accuracy
    0.0375 (scaled)         6.84        0.51        0.0070      1.0 (seed 1: 0.994, loss 0.0077)
    0.02 (HF, ceiling 10)   6.48        1.21        0.108       1.0
    0.15 (ceiling 77)       12.47       0.19        0.0001      1.0

So at hidden 512 even HF's 0.02 learns the skills (its ceiling, 10, is already 4x the
tiny model's 2.6) but its loss stalls on the ceiling; the unscaled 0.15 learns fastest
but starts confidently wrong (loss twice uniform's, gradient norm 26.5) and drives the
loss to 1e-4 with logits that may reach ~77 (where bf16's spacing is 0.5, against
0.125 below 32): a regime unlike the tiny default's. The scaled std reaches accuracy
1.0 with a loss comparable to the tiny default's.
"""
from __future__ import annotations

import os
from pathlib import Path

from workbench import atomic
from workbench.errors import UserError

BUILTIN_MODEL = "builtin:tiny-llama"
SMALL_MODEL = "builtin:small-llama"
SEED = 1234
#: The logit ceiling LoRA can reach, ~ std x hidden (see the module docstring): 0.15 x
#: 128, measured good on the tiny model's first shape (hidden 128). Every built-in
#: model's head std is this divided by its hidden size, so any width keeps the ceiling.
LOGIT_CEILING = 0.15 * 128
ARCH = dict(
    # Every matrix's row length (its input dim: hidden 256, intermediate 768, 4 heads x
    # head_dim 64 into o_proj) is a multiple of 256, the only rows llama.cpp's k-quants
    # take (export/quantize.py QK_K), so the default's q4_k_m is real Q4_K/Q6_K.
    hidden_size=256,
    intermediate_size=768,   # 3 x hidden: SwiGLU's ~8/3 x hidden (683) up to a multiple of 256
    num_hidden_layers=4,
    num_attention_heads=4,   # head_dim 64, as in real Llamas
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
SMALL_ARCH = dict(
    ARCH,
    hidden_size=512,
    intermediate_size=1536,  # SwiGLU's usual 8/3 x hidden (1365) rounded up to a multiple of 256 (k-quants)
    num_hidden_layers=6,
    num_attention_heads=8,   # head_dim 64, as in real Llamas
    num_key_value_heads=2,   # 4 query heads per kv head: GQA with a group size above the tiny one's 2
    max_position_embeddings=512,  # room for training.max_seq_len up to 512 (e.g. packed rows)
)
#: Built-in base models by their model.path name.
BUILTIN_MODELS = {BUILTIN_MODEL: ARCH, SMALL_MODEL: SMALL_ARCH}


def lm_head_std(arch: dict) -> float:
    """The lm_head init std for ``arch``: :data:`LOGIT_CEILING` / hidden size."""
    return LOGIT_CEILING / arch["hidden_size"]


#: The tiny default's head std (0.075 at hidden 256); tests and the docstring refer to it by name.
LM_HEAD_STD = lm_head_std(ARCH)


def _arch(name: str) -> dict:
    if name not in BUILTIN_MODELS:
        raise UserError(f"unknown built-in model {name!r}; the built-in models are "
                        f"{', '.join(BUILTIN_MODELS)}. Use one of them, or a local checkpoint folder.")
    return BUILTIN_MODELS[name]


def model_config(tokenizer, name: str = BUILTIN_MODEL):
    """The LlamaConfig of the built-in model ``name`` for ``tokenizer``."""
    arch = _arch(name)
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        dtype="float32",
        **arch,
    )


def build_model(tokenizer, name: str = BUILTIN_MODEL):
    """The untrained built-in Llama ``name`` (a key of :data:`BUILTIN_MODELS`) for
    ``tokenizer`` (its vocab size and special ids), identical for identical tokenizers."""
    arch = _arch(name)
    from workbench.offline import enforce_offline

    enforce_offline()
    import torch
    from transformers import LlamaForCausalLM

    config = model_config(tokenizer, name)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
        torch.nn.init.normal_(model.lm_head.weight, std=lm_head_std(arch))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def write_base(tokenizer, path: str | os.PathLike, name: str = BUILTIN_MODEL) -> Path:
    """Build the built-in base ``name`` and save it (config.json + model.safetensors)
    to ``path`` via a temp folder and rename, so a killed run leaves no half base."""
    model = build_model(tokenizer, name)  # an unknown name fails before anything is written
    with atomic.directory(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    return Path(path)
