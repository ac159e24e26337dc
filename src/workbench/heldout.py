"""The train stage's held-out eval: greedy answers to the test rows' prompts, scored by
exact match overall and per skill, for the base before training and the adapter after.
(The full evaluation of every model of a run is `workbench eval`, with lm-eval.)
"""
from __future__ import annotations

import time

from workbench import synthetic
from workbench.distributed import log


def generate_answers(model, tok, rows: list[dict], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy completions of each row's prompt (chat template + generation prompt)."""
    import torch

    was_training, side = model.training, tok.padding_side
    model.eval()
    tok.padding_side = "left"
    device = next(model.parameters()).device
    # Stop at the tokenizer's EOS and at whatever the checkpoint's generation config
    # already stops at (e.g. an end-of-turn token distinct from EOS).
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    eos += [tok.eos_token_id] if tok.eos_token_id not in eos else []
    out = []
    try:
        for i in range(0, len(rows), batch_size):
            batch = rows[i:i + batch_size]
            texts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in batch]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=eos)
            out += tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = side
        model.train(was_training)
    return out


def accuracy(model, tok, rows: list[dict], max_new_tokens: int) -> dict:
    """Exact-match accuracy overall and per skill, with a few examples."""
    preds = generate_answers(model, tok, rows, max_new_tokens)
    hits = [synthetic.score(p, r["answer"]) for p, r in zip(preds, rows)]
    by_skill: dict[str, list[bool]] = {}
    for r, h in zip(rows, hits):
        by_skill.setdefault(r["skill"], []).append(h)
    return {
        "accuracy": sum(hits) / len(hits),
        "by_skill": {k: sum(v) / len(v) for k, v in sorted(by_skill.items())},
        "rows": len(rows),
        "examples": [{"question": synthetic.question(r), "answer": r["answer"], "prediction": p}
                     for r, p in list(zip(rows, preds))[:5]],
    }


def timed_accuracy(model, tok, rows: list[dict], max_new_tokens: int, timings: dict, which: str) -> dict:
    """:func:`accuracy` of the ``which`` model ("base", "adapter"), its time in ``timings``, a line in the log."""
    t0 = time.perf_counter()
    result = accuracy(model, tok, rows, max_new_tokens)
    timings[f"eval_{which}_s"] = round(time.perf_counter() - t0, 3)
    log(f"{which} accuracy on {len(rows)} held-out rows: {result['accuracy']:.3f}")
    return result
