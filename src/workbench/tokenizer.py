"""The built-in tokenizer: byte-level BPE trained offline by our own code.

Why these choices:

* The pre-tokenizer is exactly Qwen2's (its split regex, then byte-level mapping
  without a prefix space). GGUF export has to name a known pre-tokenizer so that
  llama.cpp splits text the way we did during training; matching Qwen2's lets it
  use that existing one. The regex also isolates every digit, so "123" is three
  tokens and arithmetic is learnable by a tiny model.
* The 256-symbol byte-level alphabet is always in the vocabulary, so every
  unicode string round-trips (no unknown token exists).
* Special tokens follow ChatML: ``<|endoftext|>`` pads (there is no BOS),
  ``<|im_start|>`` opens a turn, ``<|im_end|>`` ends one and is the EOS.
* The chat template is ChatML with the newline placed *before* each following
  turn instead of after each turn, so a conversation ends exactly at the final
  ``<|im_end|>``. Whatever follows the EOS of the trained assistant turn would be
  trained into the completion (TRL adds no EOS of its own to conversational
  prompt/completion rows), and the model would learn to emit it after stopping.
  The rendering is otherwise identical to ChatML.
* Training is deterministic for a given corpus and vocab size (tested across
  processes), so a run directory's tokenizer can be rebuilt bit for bit.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterable

from workbench import atomic

QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EOS_TOKEN = IM_END
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

# An upper bound: training stops earlier once no pair of pieces occurs twice (the
# built-in corpus yields ~530 entries), which keeps the tiny model's embedding small.
DEFAULT_VOCAB_SIZE = 768

# ChatML, newline-separated turns: no text after the last message's <|im_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{% if messages %}{{ '\\n' }}{% endif %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)

# A little ordinary text (written for this project) so that prose, code-like text
# and non-Latin scripts tokenize into sensible pieces, not only the synthetic tasks.
GENERIC_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model learns what it sees often.
Training data should be checked before it is used; a bad row can hide for a long time.
She said: "It's done, isn't it?" He replied, "We'll see - they've got to test it first."
Numbers like 3.14, 2,048 and 1e-5 appear in logs, configs and papers.
def add(a, b):
    return a + b

for i in range(10):
    print(i, i * i)
{"key": "value", "list": [1, 2, 3], "ok": true}
Café, naïve, façade, jalapeño, Größe, smørrebrød, Ångström.
Москва — столица России. Привет, мир!
Καλημέρα κόσμε. Ελληνικά γράμματα: α β γ δ.
東京は日本の首都です。こんにちは世界。
北京是中国的首都。你好，世界。
서울은 한국의 수도입니다. 안녕하세요.
مرحبا بالعالم. שלום עולם.
Emoji: 🙂 🚀 ✅ — arrows → ← and math ∑ ∫ ≤ ≥ ≠ ±.
Tabs\tand  double  spaces, trailing spaces   
and blank lines


end here.
"""


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers.

    Returns a ``transformers.PreTrainedTokenizerFast`` with the ChatML special
    tokens and chat template. The same texts and vocab size give the same
    vocabulary and merges every time.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (special tokens plus the 256 byte symbols)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return _wrap(tok)


def _wrap(backend):
    """The transformers view of a trained ``tokenizers.Tokenizer``: ChatML specials
    and template, no BOS, right padding for training (generation pads left itself)."""
    from workbench.offline import enforce_offline

    enforce_offline()
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )


def save_tokenizer(tok, path: str | os.PathLike) -> Path:
    """Save ``tok`` to the folder ``path`` (tokenizer.json, tokenizer_config.json
    with the chat template inside it, where GGUF converters look) via a temp folder
    and rename, so a killed run leaves no half-written tokenizer."""
    with atomic.directory(path) as tmp:
        tok.save_pretrained(tmp, save_jinja_files=False)
    return Path(path)


@functools.lru_cache(maxsize=1)
def _default_tokenizer_json() -> str:
    from workbench import synthetic

    return train_tokenizer(synthetic.tokenizer_corpus() + [GENERIC_TEXT]).backend_tokenizer.to_str()


def default_tokenizer():
    """The built-in tokenizer: trained on the synthetic tasks plus a little generic
    text. Each call returns a fresh object (training runs once per process)."""
    from tokenizers import Tokenizer

    return _wrap(Tokenizer.from_str(_default_tokenizer_json()))
