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

from .compare import hf_logits, logit_metrics

#: Thresholds per GGUF type, checked against both readers (llama.cpp and transformers).
#: Measured with llama-cpp-python 0.3.36 on the CPU, on heldout_windows (512 tokens of
#: the held-out rows as training tokenizes them, one window per row; KL and top-1 over
#: the distinct contexts), llama.cpp reader, the worst of each column:
#:
#:           trained built-in default (hidden 256;     random tiny test models (hidden 64),
#:           800 steps x seeds 0-3, and test_eval's    6 families x 2 seeds
#:           200 steps at lr 3e-3 x seeds 0-2)         (tests/_export_run.py)
#:           KL mean  top-1  |ppl delta|               KL mean  top-1  |ppl delta|
#:   f16     1.7e-6   0.997  4.1e-4                    6.4e-7   0.997  1.7e-4
#:   bf16    5.2e-5   0.994  3.2e-3                    3.3e-5   0.972  1.3e-3
#:   q8_0    4.8e-4   0.983  1.0e-2                    3.7e-4   0.939  6.0e-3
#:   q4_k_m  6.5e-2   0.904  0.19                      1.1e-2   0.669  2.9e-2
#:
#: f16 is not bit-exact because llama.cpp rounds activations to f16 in its matmuls;
#: q8_0 also quantizes activations to 8 bits (transformers' weight-only reading of
#: the same file: about half the KL). The default's q4_k_m is real Q4_K/Q6_K (every
#: row a multiple of 256); the hidden-64 test models' falls back to Q5_0/Q8_0 (rows
#: < 256, see quantize.py): the same 6 families x 2 seeds at hidden 256 (real Q4_K)
#: reach KL 3.2e-2, top-1 0.46, |ppl delta| 2.3e-2. Random models have flat
#: next-token distributions, so top-1 flips on near-ties; KL is the sharp metric. So
#: does a model barely moved from the built-in base (near-uniform by design, see
#: workbench/default.py): 3-step runs' q4_k_m has top-1 0.51 (DPO) to 1.0 (SFT) at KL
#: 0.011-0.022. q4_k_m's top-1 limit, 0.35, is 0.76x the worst seen (0.46), as 0.55 was
#: 0.78x the worst of the fallback types.
#: The f16, bf16 and q8_0 limits sit about 6x above the worst KL and 5-16x above the
#: worst ppl delta seen, and far below a real conversion bug (KL of an f16 file, same ids):
#:
#:   llama rope rows not reordered (gguf_writer.permute_rope_rows skipped):
#:     trained default 1.8-2.8 (800 steps), 0.30-0.88 (200 steps);
#:     random models 0.11-0.14 (hidden 256), 0.055-0.094 (hidden 64);
#:     3-step built-in runs 4.3e-4 to 6.3e-4 (near-uniform attention: 43x the f16 limit)
#:   Gemma norms without + 1: gemma 4.8-5.3 (hidden 256), 0.98-1.0 (hidden 64); gemma2,
#:     whose final logits are soft-capped at 5: 0.41-0.42 (hidden 256), 0.30-0.32 (64)
#:
#: q4_k_m cannot have both margins at this size. Its KL limit, 0.1, is 1.5x above the
#: worst real Q4_K seen, 18x below the rope mistake on the 800-step default and 3x below
#: it on 200-step runs; but on random models the mistake (0.055-0.14) falls under or
#: near that limit, and on barely trained ones (4e-4) far below real Q4_K's own KL
#: (0.011-0.022): there q4_k_m's numbers cannot tell the mistake apart. The f16 file,
#: which every export writes with the same writer and verifies, does (limit 1e-5).
#: The ppl delta is over every token, and most are prompt tokens, which training never
#: made targets (the loss is on the replies): the trained adapter is confidently wrong
#: there (token perplexity 5,700-12,000 at 800 steps, against 1.01-1.04 on the replies),
#: so Q4_K's noise on those logits moves the perplexity by up to a fifth (-0.19 at seed
#: 2, +0.12 for test_eval's run), while on the reply tokens it moves it by at most 2.9%
#: (and the rope mistake by +53% to +12,800%). The limit, 0.3, is 1.6x above the worst
#: seen.
#: On the former held-out text (the rows as plain "question\nanswer", no chat template,
#: in windows of 128) the default's q4_k_m reached KL 0.13, and on test_eval's run the
#: rope mistake (KL 0.026) was below real Q4_K (0.044): that text could not tell them apart.
DEFAULT_THRESHOLDS = {
    "f16": {"kl_mean": 1e-5, "top1_agreement": 0.98, "ppl_rel_delta": 5e-3},
    "bf16": {"kl_mean": 3e-4, "top1_agreement": 0.93, "ppl_rel_delta": 5e-2},
    "q8_0": {"kl_mean": 3e-3, "top1_agreement": 0.85, "ppl_rel_delta": 5e-2},
    "q4_k_m": {"kl_mean": 1e-1, "top1_agreement": 0.35, "ppl_rel_delta": 3e-1},
}

#: Held-out ids compared: EVAL_TOKENS in all, one window per row of at most EVAL_WINDOW.
EVAL_TOKENS = 512
EVAL_WINDOW = 128


def heldout_rows(run: str | Path) -> tuple[list[dict], str]:
    """The run's held-out rows and where they came from (RUN/data/test.jsonl, which the train
    stage writes; else the built-in test split for the recorded seed, e.g. for a merged model
    brought with ``workbench export --merged``)."""
    from workbench import manifest
    from workbench.eval.suite import load_test_rows

    return load_test_rows(Path(run), manifest.stage(Path(run), "train"))


def chat_rendered(tokenizer) -> bool:
    """Whether :func:`heldout_texts` renders through the tokenizer's chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def heldout_texts(tokenizer, rows: list[dict]) -> list[str]:
    """Each held-out row as the model is trained on it: prompt + completion through the
    tokenizer's chat template, the text ``data.training_dataset`` tokenizes.

    Fallback: a tokenizer without a chat template (only a merged model brought with its own
    tokenizer can lack one: training refuses such a tokenizer) gets each row as plain
    "question\\nanswer\\n\\n" text (the rows' former verification text), which is not the
    text a chat model was trained on; the export report and the qualify gates say which of
    the two was compared (:func:`heldout_label`)."""
    from workbench import synthetic

    texts = []
    for r in rows:
        prompt, completion = r.get("prompt"), r.get("completion")
        if chat_rendered(tokenizer) and isinstance(prompt, list) and isinstance(completion, list):
            texts.append(tokenizer.apply_chat_template(prompt + completion, tokenize=False))
        else:
            question = synthetic.question(r) if isinstance(prompt, list) else str(prompt)
            texts.append(f"{question}\n{r.get('answer', completion)}\n\n")
    return texts


def heldout_windows(tokenizer, max_positions: int, rows: list[dict]) -> tuple[list[list[int]], int]:
    """The ids every logit comparison of a run is made on — the merge stage, the export
    stage (each GGUF, and the adapter GGUF on its bases) and the qualify gates that recompute
    them — and the window length.

    One window per held-out row, evaluated from an empty context as training sees a row
    (``training.packing`` is off by default), holding the ids training makes of it
    (:func:`heldout_texts`): a chat-rendered row tokenized as ``apply_chat_template`` does
    (its text holds its own special tokens; none are added), the ids
    ``data.training_dataset`` trains on; a plain one with the tokenizer's special tokens
    (e.g. a BOS). Rows are taken skill by skill in turn (``eval.suite.interleave``), so the
    EVAL_TOKENS ids cover every skill rather than the first one of the split; a row longer
    than EVAL_WINDOW (or the model's positions) is cut there, keeping its start as
    training's max_seq_len cut does. :func:`ids_sha256` fingerprints the result, so the
    gates can check that they compare what the stages compared.

    Every row starts with the same template tokens, so those first contexts recur in every
    window; ``compare.logit_metrics`` counts each distinct context once (otherwise one
    near-tie there, two logits 1e-3 apart, flips top-1 in every window at once: measured
    f16 top-1 0.961 on a trained tiny llama). Rows one after another in longer windows were
    measured too and are not the trained form: the rows before a reply confuse a trained
    tiny llama (reply-token perplexity 2-5, against 1.2 for a row alone)."""
    from workbench.eval.suite import interleave

    special = not chat_rendered(tokenizer)
    window = min(EVAL_WINDOW, max_positions)
    wins: list[list[int]] = []
    total = 0
    for text in heldout_texts(tokenizer, interleave(rows)):
        if total >= EVAL_TOKENS:
            break
        ids = tokenizer(text, add_special_tokens=special)["input_ids"][:min(window, EVAL_TOKENS - total)]
        if len(ids) >= 2:   # a single id predicts nothing
            wins.append(ids)
            total += len(ids)
    if not wins:
        raise UserError("the held-out rows are too short to compare logits on (fewer than 2 tokens each); give "
                        "held-out rows with a prompt and a reply (data.test).")
    return wins, window


def heldout_label(tokenizer, source: str) -> str:
    """What :func:`heldout_windows` compared, in words (the export report and the gates say it)."""
    form = ("prompt + reply through the tokenizer's chat template, as training tokenizes them" if
            chat_rendered(tokenizer) else "as plain 'question\\nanswer' text: the tokenizer has no chat template")
    return f"held-out rows ({source}), one window per row, skills in turn, {form}"


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
