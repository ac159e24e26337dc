"""An lm-eval model class for GGUF files, run in-process by llama.cpp (llama-cpp-python).

lm-eval's own ``gguf`` backend talks to a llama.cpp HTTP server, has no rolling
loglikelihood (perplexity) and no chat templates; this class has all three and
needs no server. It is registered as ``workbench-gguf``::

    simple_evaluate(model="workbench-gguf", model_args={"path": "model-q8_0.gguf"}, ...)

Comparable with HFLM by construction: it subclasses lm-eval's ``TemplateLM``,
like HFLM, so the context/continuation split (trailing spaces of the context
move to the continuation; the pair is tokenized whole and split at the
context's token count) is lm-eval's own code for both backends, and it scores
the same token windows as HFLM does (left truncation to ``max_length``, rolling
windows from ``lm_eval.utils``).

BOS, so that perplexities compare like for like: token ids come from the GGUF's
own tokenizer (llama.cpp), which the export stage checks against the HF one.
A text gets the tokenizer's special tokens exactly when HF's
``tokenizer.encode(text)`` would (llama.cpp's ``add_special`` follows the GGUF's
``tokenizer.ggml.add_bos_token``/``add_eos_token``), except that a text already
starting with the prefix token gets none, as in HFLM. An empty context and the
first rolling window are prefixed with ``prefix_token_id``: the BOS id when the
GGUF declares one, else the EOS id, as HFLM's default. For a tokenizer that adds
a BOS itself, HFLM's rolling windows therefore start with BOS BOS and score
log p(BOS | BOS) once per document; this class does the same on purpose, so the
two backends' perplexities stay comparable (both include that term). The
built-in tokenizer has no BOS: its prefix is ``<|im_end|>``, its texts get none.

Decoding is greedy only (what the shipped tasks use); a task asking for
sampling is refused rather than silently decoded greedily. Generation stops at
any end-of-generation token llama.cpp knows for the vocab (EOS, and e.g.
``<|endoftext|>``), HF at the generation config's EOS ids; a model only differs
there if it emits such a token that is not its EOS.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

import lm_eval.models  # noqa: F401  (fills the lazy model registry first, so ours is not skipped)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from workbench.errors import UserError

MODEL_NAME = "workbench-gguf"
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's default


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (adds no error of its own to the comparison)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@register_model(MODEL_NAME)
class GGUFLM(TemplateLM):
    """One GGUF file in llama.cpp on the CPU (or wherever llama-cpp-python was built for)."""

    def __init__(self, path: str, max_length: int | None = None, n_threads: int | None = None, **_ignored) -> None:
        """``_ignored``: what simple_evaluate passes every model class (batch_size,
        device, ...); requests run one at a time on llama.cpp's own device."""
        super().__init__()
        import llama_cpp

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"GGUF file {self.path} does not exist; run `workbench export --run DIR` first.")
        # n_ctx 0 sizes llama.cpp's buffers for the trained context, which is then
        # max_length: HFLM's default (the config's max_position_embeddings).
        n_ctx = int(max_length or 0)
        # Prompts (batches) get as many threads as single tokens: llama-cpp-python's
        # default gives batches every core, and its spin barriers stall when the cores
        # are shared (a 33-token batch took 0.21 s instead of 0.012 s on a busy 2-core machine).
        n_threads = int(n_threads or max(1, (os.cpu_count() or 2) // 2))
        self.llm = llama_cpp.Llama(str(self.path), logits_all=True, n_ctx=n_ctx, n_batch=min(n_ctx or 512, 512),
                                   n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
        self._max_length = n_ctx or self.llm._model.n_ctx_train()
        self._vocab = self.llm._model.vocab
        meta = self.meta = self.llm.metadata
        self._eos = int(meta["tokenizer.ggml.eos_token_id"])
        # From the metadata, not llama.cpp's token_bos(): for a BPE vocab without a
        # BOS key llama.cpp reports a default id (11), which is no BOS of ours.
        bos = meta.get("tokenizer.ggml.bos_token_id")
        self._bos = int(bos) if bos is not None else None
        self._template = meta.get("tokenizer.chat_template")
        self._evaluated: list[int] = []   # the token ids whose logits llama.cpp holds now

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self._eos

    @property
    def prefix_token_id(self) -> int:
        return self._bos if self._bos is not None else self._eos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return DEFAULT_MAX_GEN_TOKS

    def _piece(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Ids of ``string``, special-token text parsed as special tokens. With
        ``add_special`` llama.cpp adds BOS/EOS as the GGUF's add_bos/add_eos flags
        say, as HF's encode does by default; None means yes unless the text already
        starts with the prefix token (HFLM's rule)."""
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(self._piece(self.prefix_token_id))
        return self.llm.tokenize(string.encode("utf-8"), add_bos=add_special_tokens, special=True)

    def tok_decode(self, tokens: list[int]) -> str:
        """Text of ``tokens`` with special tokens dropped (HFLM: skip_special_tokens=True)."""
        return self.llm.detokenize(tokens, special=False).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ llama.cpp
    def _eval(self, tokens: list[int]) -> None:
        """Make llama.cpp hold logits for every position of ``tokens``, reusing the
        longest prefix already evaluated (its logits rows stay valid; the KV cache
        past it is dropped by ``Llama.eval``)."""
        keep = 0
        for a, b in zip(self._evaluated, tokens):
            if a != b:
                break
            keep += 1
        self.llm.n_tokens = keep
        self.llm.eval(tokens[keep:])
        self._evaluated = list(tokens)

    def _rows(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.llm.scores[start:stop], dtype=np.float32)

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), whether greedy decoding gives the
        continuation) per (key, context ids, continuation ids); the window is
        HFLM's: the last max_length + 1 ids, minus the last one, are the input."""
        # Sorted by ids, requests that share a context (multiple choice) are
        # neighbours and reuse its evaluation.
        order = sorted(range(len(requests)), key=lambda i: requests[i][1] + requests[i][2])
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for i in tqdm(order, disable=disable_tqdm, desc="Running loglikelihood requests (GGUF)"):
            key, context, continuation = requests[i]
            if not context or not continuation:   # TemplateLM gives an empty context the prefix token
                raise ValueError("a loglikelihood request needs context and continuation tokens")
            window = (context + continuation)[-(self.max_length + 1):][:-1]
            self._eval(window)
            n = len(continuation)
            logp = _log_softmax(self._rows(len(window) - n, len(window)))
            target = np.asarray(continuation, dtype=np.int64)
            answer = (float(logp[np.arange(n), target].sum()), bool((logp.argmax(-1) == target).all()))
            out[i] = answer
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm,
                              desc="Running loglikelihood_rolling requests (GGUF)"):
            windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            total = sum(score for score, _ in scores)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        import llama_cpp

        eos_text = self._piece(self._eos)
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm,
                                        desc="Running generate_until requests (GGUF)"):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise UserError("the GGUF backend decodes greedily only, but a task asks for sampling "
                                "(generation_kwargs do_sample: true); set do_sample: false in that task.")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise UserError(f"a task asks for {max_gen} new tokens, but the model's context is "
                                f"{self.max_length}; lower max_gen_toks in that task.")
            tokens = self.tok_encode(context)[-(self.max_length - max_gen):]
            start = len(tokens)
            for _ in range(max_gen):
                self._eval(tokens)
                nxt = int(self._rows(len(tokens) - 1, len(tokens))[0].argmax())
                if llama_cpp.llama_vocab_is_eog(self._vocab, nxt):
                    break
                tokens.append(nxt)
                if any(s and s in self.tok_decode(tokens[start:]) for s in until):
                    break
            text = postprocess_generated_text(self.tok_decode(tokens[start:]), until, None)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The GGUF's own chat template, rendered by transformers' Jinja renderer
        with HFLM's arguments, so both backends see the same prompt text."""
        if not self._template:
            raise UserError(f"{self.path.name} has no chat template (tokenizer.chat_template); evaluate it with "
                            "--no-chat-template, or export it from a tokenizer that has one.")
        from transformers.utils.chat_template_utils import render_jinja_template

        specials = {"eos_token": self._piece(self._eos)}
        if self._bos is not None:
            specials["bos_token"] = self._piece(self._bos)
        rendered, _ = render_jinja_template(conversations=[chat_history], chat_template=self._template,
                                            add_generation_prompt=add_generation_prompt,
                                            continue_final_message=not add_generation_prompt, **specials)
        return rendered[0]

    @property
    def tokenizer_name(self) -> str:
        return self.path.name

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self._template if chat_template else None

    def get_model_info(self) -> dict:
        return {"model_path": str(self.path), "gguf_file_type": self.meta.get("general.file_type"),
                "max_length": self.max_length}

    def close(self) -> None:
        self.llm.close()
