"""Numeric round trip of an exported GGUF against the HF merged model.

Two independent readers of the same file:

* llama.cpp (the runtime users will run the GGUF with), through llama-cpp-python:
  logits on the same token ids as the HF model, per-position KL, top-1 agreement,
  max logit difference and the perplexity delta on held-out text; and the tokenizer
  round trip (llama.cpp's tokenizer, built from the GGUF metadata, must give the
  HF tokenizer's ids on a corpus of awkward strings and on chat-template output);
* transformers' own GGUF loader (dequantizes with gguf-py), for the archs and
  tensor types it supports; recorded as unsupported otherwise.

Pass/fail thresholds per output type are in ``DEFAULT_THRESHOLDS``; a YAML file
with the same shape overrides them (``workbench export --thresholds FILE``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from workbench.errors import UserError

from .compare import hf_logits, logit_metrics, windows

#: Thresholds per GGUF type, checked against both readers (llama.cpp and transformers).
#: Measured with llama-cpp-python 0.3.36 on the CPU, 512 tokens of
#: workbench.synthetic.heldout_text() in windows of 128, llama.cpp reader:
#:
#:           trained built-in default          random tiny test models, worst of
#:           (tiny llama, 250 LoRA steps)      6 families x 2 seeds (tests/_export_run.py)
#:           KL mean  top-1  ppl delta         KL mean  top-1  |ppl delta|
#:   f16     3.7e-7   1.000  +4.9e-4           6.3e-7   0.996  2.2e-4
#:   bf16    3.1e-5   0.998  -7.4e-3           2.8e-5   0.979  1.4e-3
#:   q8_0    2.5e-4   0.998  -4.2e-3           3.3e-4   0.922  4.3e-3
#:   q4_k_m  2.1e-2   0.969  +1.5e-2           1.1e-2   0.701  3.1e-2
#:
#: f16 is not bit-exact because llama.cpp rounds activations to f16 in its matmuls;
#: q8_0 also quantizes activations to 8 bits (transformers' weight-only reading of
#: the same file: about half the KL); the tiny models' q4_k_m mostly falls back to
#: q5_0/q8_0 (rows < 256, see quantize.py). The held-out text is plain Q/A while the
#: default adapter is trained on chat turns, so its perplexity is ~3000 and the ppl
#: delta is dominated by very unlikely tokens (hence bf16's 7e-3). Random models
#: have flat next-token distributions, so top-1 flips on near-ties; KL is the sharp
#: metric. The limits sit 7-15x above the worst KL / ppl delta seen, and far below
#: a real conversion bug (llama rope rows not reordered: KL 0.17; Gemma norms
#: without + 1: KL 0.9).
DEFAULT_THRESHOLDS = {
    "f16": {"kl_mean": 1e-5, "top1_agreement": 0.98, "ppl_rel_delta": 5e-3},
    "bf16": {"kl_mean": 3e-4, "top1_agreement": 0.93, "ppl_rel_delta": 5e-2},
    "q8_0": {"kl_mean": 3e-3, "top1_agreement": 0.85, "ppl_rel_delta": 5e-2},
    "q4_k_m": {"kl_mean": 1e-1, "top1_agreement": 0.55, "ppl_rel_delta": 1.5e-1},
}

#: Held-out text evaluated: the first EVAL_TOKENS ids, in windows of EVAL_WINDOW.
EVAL_TOKENS = 512
EVAL_WINDOW = 128


def heldout_windows(tokenizer, max_positions: int, heldout: str | None = None) -> tuple[list[list[int]], int]:
    """The held-out ids every export check compares logits on, and the window length:
    ``heldout`` (default ``workbench.synthetic.heldout_text()``: the built-in held-out
    rows as plain "question\\nanswer" text, no chat template), tokenized, its first
    EVAL_TOKENS ids in windows of EVAL_WINDOW (at most the model's positions)."""
    if heldout is None:
        from workbench.synthetic import heldout_text

        heldout = heldout_text()
    window = min(EVAL_WINDOW, max_positions)
    return windows(tokenizer(heldout)["input_ids"], window, EVAL_TOKENS), window


def ids_sha256(wins: list[list[int]]) -> str:
    """A fingerprint of the compared token ids (the qualify gates check they compare the same ones)."""
    import hashlib

    return hashlib.sha256(json.dumps(wins).encode()).hexdigest()


def load_thresholds(path: str | Path | None) -> dict:
    """DEFAULT_THRESHOLDS, with a YAML file's values (same shape) on top."""
    from workbench.config import read_yaml_file

    thresholds = {k: dict(v) for k, v in DEFAULT_THRESHOLDS.items()}
    if path is None:
        return thresholds
    path = Path(path)
    data = read_yaml_file(path, "thresholds file", "pass a readable YAML mapping.")
    if not isinstance(data, dict):
        raise UserError(f"thresholds file {path} must be a mapping of type -> {{metric: limit}}.")
    for quant, limits in data.items():
        if quant == "adapter":
            continue   # the adapter GGUF's limits (workbench.export.adapter_export.load_thresholds)
        unknown = set(limits) - set(DEFAULT_THRESHOLDS["f16"]) if isinstance(limits, dict) else {"(not a mapping)"}
        if quant not in thresholds or unknown:
            raise UserError(f"thresholds file {path}: unknown type {quant!r} or metric(s) {sorted(unknown)}; "
                            f"types: {', '.join(thresholds)}; metrics: {', '.join(DEFAULT_THRESHOLDS['f16'])}.")
        for key, value in limits.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (key == "top1_agreement" and value > 1):
                raise UserError(f"thresholds file {path}: {quant}.{key} must be a finite number >= 0"
                                + (" and at most 1 (a fraction)" if key == "top1_agreement" else "")
                                + f", got {value!r}.")
            thresholds[quant][key] = float(value)
    return thresholds


def failures(metrics: dict, limits: dict) -> list[str]:
    """Human-readable threshold violations (empty when the metrics pass). A metric
    that is missing, not a number, NaN or infinite fails: it is not within any limit."""
    import math

    out = []
    for key, limit in limits.items():
        value = metrics.get(key)
        try:
            value = float(value)
        except (TypeError, ValueError):
            out.append(f"{key} is missing" if value is None else f"{key} is {value!r}, not a number")
            continue
        if not math.isfinite(value):
            out.append(f"{key} is {value} (not a finite number)")
            continue
        # Written as "not within" so that anything a comparison cannot order fails too.
        within = value >= limit if key == "top1_agreement" else abs(value) <= limit
        if not within:
            out.append(f"{key} {value:.3g} {'<' if key == 'top1_agreement' else '>'} {limit:g}")
    return out


def tokenizer_corpus(hf_tokenizer, heldout: str) -> list[str]:
    """Strings whose ids must match: unicode, whitespace runs, special tokens in
    and around text, and what the chat template renders."""
    specials = list(hf_tokenizer.all_special_tokens)
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 plus 2?  Answer with   spaces.\n"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Größe? 東京? 🙂"},
    ]
    corpus = [
        "Hello world", " leading space", "trailing space ", "  two  spaces  ", "\t\ttabs\tand\n\nnewlines\n\n\n",
        "\r\nwindows line\r\n", "     ", "\n", "it's I'M we'LL they've", "1234567890 3.14159 1e-5 -42",
        "Café naïve façade Größe smørrebrød Ångström", "Привет, мир!", "Καλημέρα κόσμε", "東京は日本の首都です。",
        "你好，世界", "서울은 한국의 수도입니다", "مرحبا بالعالم", "🙂 🚀 ✅ → ∑ ≤ ≠ ±", "a\u200bzero\u00a0width",
        "def f(x):\n    return x * 2  # comment\n", '{"key": [1, 2, 3], "ok": true}', heldout[:2000],
    ]
    corpus += specials + [f"x{s}y {s} {s}{s}\n" for s in specials]
    if hf_tokenizer.chat_template:
        corpus.append(hf_tokenizer.apply_chat_template(conversation, tokenize=False))
        corpus.append(hf_tokenizer.apply_chat_template(conversation[:2], tokenize=False, add_generation_prompt=True))
    return corpus


class LlamaCpp:
    """One GGUF opened in llama.cpp (CPU) with logits for every position."""

    def __init__(self, path: str | Path, n_ctx: int, lora_path: str | Path | None = None):
        import logging

        import llama_cpp

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        self.llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, verbose=False,
                                   lora_path=str(lora_path) if lora_path else None)

    def logits(self, wins: list[list[int]]) -> list[torch.Tensor]:
        import numpy as np

        out = []
        for w in wins:
            self.llm.reset()
            self.llm.eval(w)
            out.append(torch.from_numpy(np.array(self.llm.scores[:len(w)], dtype=np.float32)))
        return out

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def close(self) -> None:
        self.llm.close()


def tokenizer_roundtrip(llm: LlamaCpp, hf_tokenizer, corpus: list[str]) -> dict:
    mismatches = []
    for text in corpus:
        want = hf_tokenizer.encode(text, add_special_tokens=False)
        got = llm.tokenize(text)
        if got != want:
            mismatches.append({"text": text[:200], "hf": want[:64], "llama_cpp": got[:64]})
    return {"strings": len(corpus), "mismatches": mismatches}


def transformers_check(path: Path, hf_model, ref: list[torch.Tensor], wins: list[list[int]]) -> dict:
    """Load the GGUF's tensors with transformers' GGUF loader and compare, where it
    supports the architecture. The tensors (names, rope row order, Gemma's norm
    offset, dequantization) are read back by transformers' own code; the config is
    the merged model's, because transformers' GGUF config mapping misses keys we
    write (e.g. qwen3's head_dim via attention.key_length) — llama.cpp checks those."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    hf_config, device = hf_model.config, next(hf_model.parameters()).device
    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        return {"supported": False, "reason": f"transformers' GGUF loader does not support the {arch!r} architecture"}
    if hf_config.model_type != arch:   # mistral is written as llama: read it back as llama
        from transformers import AutoConfig

        fields = {k: v for k, v in hf_config.to_dict().items() if k not in ("model_type", "architectures")}
        hf_config = AutoConfig.for_model(arch, **fields)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, config=hf_config,
                                                     dtype=torch.float32).to(device).eval()
    except (ValueError, RuntimeError, KeyError, NotImplementedError) as err:
        return {"supported": False, "reason": f"transformers could not load it: {str(err).splitlines()[0][:300]}"}
    return {"supported": True, **logit_metrics(ref, hf_logits(model, wins), wins)}


def verify(path: str | Path, hf_model, hf_tokenizer, wins: list[list[int]], ref: list[torch.Tensor],
           heldout: str) -> dict:
    """All checks for one GGUF. ``ref``: ``hf_model``'s logits on ``wins`` (computed
    once by the caller and shared across GGUFs); ``heldout`` joins the tokenizer corpus."""
    path = Path(path)
    llm = LlamaCpp(path, n_ctx=max(len(w) for w in wins))
    try:
        llama = logit_metrics(ref, llm.logits(wins), wins)
        tokens = tokenizer_roundtrip(llm, hf_tokenizer, tokenizer_corpus(hf_tokenizer, heldout))
    finally:
        llm.close()
    return {"llama_cpp": llama, "tokenizer": tokens, "transformers": transformers_check(path, hf_model, ref, wins)}
