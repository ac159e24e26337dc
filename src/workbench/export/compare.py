"""Logit comparison between a reference model and a converted one, on the same token ids.

Used by the merge stage (merged vs adapter-on-base) and the export stage (GGUF via
llama.cpp vs the HF merged model). Everything is computed in float64 so the
metric itself adds no error to what it measures.
"""
from __future__ import annotations

import math

import torch


def _nll(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Per-position negative log-likelihood of the next token (positions 0..T-2)."""
    logp = torch.log_softmax(logits[:-1], dim=-1)
    target = torch.tensor(ids[1:], dtype=torch.long)
    return -logp.gather(-1, target[:, None])[:, 0]


def perplexity(logits: list[torch.Tensor], wins: list[list[int]]) -> float:
    nll = torch.cat([_nll(lg.double(), w) for lg, w in zip(logits, wins)])
    return math.exp(nll.mean().item())


def distinct_contexts(wins: list[list[int]]) -> torch.Tensor:
    """A mask over the windows' positions (concatenated): True at the first position of
    each distinct context, a window's ids up to and including that position. A context
    that occurs again (windows that start alike, e.g. every chat row's template start)
    gives the same logits again, so it is counted once."""
    nodes: dict[tuple[int, int], int] = {}   # (parent context, next id) -> context: a trie
    first = []
    for w in wins:
        node = -1
        for token in w:
            key = (node, token)
            first.append(key not in nodes)
            node = nodes.setdefault(key, len(nodes))
    return torch.tensor(first, dtype=torch.bool)


def logit_metrics(ref: list[torch.Tensor], test: list[torch.Tensor], wins: list[list[int]]) -> dict:
    """KL(ref || test) per position (mean and max), top-1 agreement, max and mean
    absolute logit difference, each over the distinct contexts (:func:`distinct_contexts`:
    ``positions`` is their count), and both perplexities of the windows' tokens with the
    relative delta.

    ``ref``/``test``: one [T, V] logits tensor per window; ``wins``: the ids."""
    r = torch.cat([x.double() for x in ref])
    t = torch.cat([x.double() for x in test])
    if r.shape != t.shape:
        raise ValueError(f"logit shapes differ: {tuple(r.shape)} vs {tuple(t.shape)}")
    once = distinct_contexts(wins)
    if once.shape[0] != r.shape[0]:
        raise ValueError(f"{r.shape[0]} logit rows for {once.shape[0]} ids")
    r, t = r[once], t[once]
    lr, lt = torch.log_softmax(r, -1), torch.log_softmax(t, -1)
    kl = (lr.exp() * (lr - lt)).sum(-1).clamp_min(0.0)   # tiny negative values are rounding
    diff = (r - t).abs()
    ppl_ref, ppl_test = perplexity(ref, wins), perplexity(test, wins)
    return {
        "positions": int(r.shape[0]),
        "kl_mean": kl.mean().item(),
        "kl_max": kl.max().item(),
        "top1_agreement": (r.argmax(-1) == t.argmax(-1)).double().mean().item(),
        "max_abs_logit_diff": diff.max().item(),
        "mean_abs_logit_diff": diff.mean().item(),
        "ppl_ref": ppl_ref,
        "ppl": ppl_test,
        "ppl_rel_delta": ppl_test / ppl_ref - 1.0,
    }


@torch.no_grad()
def hf_logits(model, wins: list[list[int]]) -> list[torch.Tensor]:
    """Logits of a transformers model (any dtype) per window, as float32 on the CPU."""
    device = next(model.parameters()).device
    return [model(torch.tensor([w], device=device)).logits[0].float().cpu() for w in wins]
