"""Tokenizer metadata for GGUF: llama.cpp's ``gpt2`` (byte-level BPE) tokenizer.

llama.cpp does not run the HF pre-tokenizer; it re-implements a fixed set of them
and picks one by the name in ``tokenizer.ggml.pre``. Naming the wrong one silently
changes how text is split, so the name is decided from *behaviour*: the checkpoint's
own pre-tokenizer splits a fixed probe text, and that split must equal the split of
one reference pre-tokenizer we build from a known regex. (llama.cpp's converter
identifies known tokenizers by hashing the token ids of a probe text, which only
recognises tokenizers with exactly those vocabularies; comparing the split before
any vocabulary is applied also recognises a freshly trained tokenizer such as ours.)
Anything else — another split, a normalizer, a non-BPE model — is refused.

What the rest of the metadata means (token types, special ids, add_bos) is decided
from the HF tokenizer's behaviour too, not from config keys that may be absent.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import UserError

#: llama.cpp pre-tokenizer name -> the split regex it implements (byte-level after).
KNOWN_PRE_TOKENIZERS = {
    "qwen2": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "llama-bpe": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "gpt-2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
}

#: Text whose split tells the known pre-tokenizers apart: upper-case contractions
#: (case-insensitive or not), digit runs (1, 1-3 or any), a letter after punctuation,
#: newline and space runs, non-Latin scripts and symbols.
PROBE_TEXT = (
    "He'S here, we'LL see; it's 1234567 or 89.\n\n\n  Tabs\tand   spaces   \r\n"
    "ünïcödé Größe Привет 你好世界 مرحبا 🙂🚀 ...!!! x=(a+b)*c; 'quoted' "
    "don't I'm you're they've I'd\n \n"
)

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5   # gguf.TokenType values


@dataclass
class TokenizerMeta:
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)   # bos/eos/pad/unk -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    padded: int = 0      # unused ids added to reach the model's vocab size
    notes: list[str] = field(default_factory=list)

    def add_to(self, writer) -> None:
        """Write onto a gguf.GGUFWriter."""
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _reference_split(pattern: str, text: str) -> list[str]:
    from tokenizers import Regex, pre_tokenizers

    ref = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return [piece for piece, _ in ref.pre_tokenize_str(text)]


def detect_pre_tokenizer(backend) -> str:
    """The llama.cpp pre-tokenizer name whose split equals ``backend``'s (a
    ``tokenizers.Tokenizer``) on the probe text; UserError if none does."""
    normalizer = backend.normalizer
    if normalizer is not None and type(normalizer).__name__ != "NFC":
        raise UserError(f"the tokenizer has a {type(normalizer).__name__} normalizer, which llama.cpp's byte-level "
                        "BPE tokenizer does not apply; export needs a tokenizer without one.")
    if backend.pre_tokenizer is None:
        raise UserError("the tokenizer has no pre-tokenizer; llama.cpp needs one of its known byte-level splits "
                        f"({', '.join(KNOWN_PRE_TOKENIZERS)}).")
    split = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(PROBE_TEXT)]
    for name, pattern in KNOWN_PRE_TOKENIZERS.items():
        if split == _reference_split(pattern, PROBE_TEXT):
            return name
    raise UserError("the tokenizer's pre-tokenizer splits text unlike every pre-tokenizer llama.cpp knows "
                    f"({', '.join(KNOWN_PRE_TOKENIZERS)}), so a GGUF would tokenize differently; "
                    "use a tokenizer with one of those splits.")


def load(tok_dir: str | Path, n_vocab: int) -> TokenizerMeta:
    """Everything the GGUF needs about the tokenizer in ``tok_dir`` for a model with
    ``n_vocab`` embedding rows.

    The tokenizer is taken as ``AutoTokenizer`` loads it from ``tok_dir`` — what a
    user of the HF checkpoint gets, and what the round trip compares with. (With a
    config.json saying qwen2, transformers 5 rebuilds any tokenizer.json as its
    Qwen2Tokenizer: Qwen2's split plus an NFC normalizer.)"""
    from transformers import AutoTokenizer

    tok_dir = Path(tok_dir)
    if not (tok_dir / "tokenizer.json").is_file():
        raise UserError(f"no tokenizer at {tok_dir} (tokenizer.json is missing); the merged model folder must carry "
                        "the run's tokenizer — rerun `workbench merge`.")
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    backend = hf.backend_tokenizer
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
        raise UserError(f"tokenizer model {model.get('type')!r} is not supported by the GGUF exporter; "
                        "only byte-level BPE tokenizers (llama.cpp's gpt2 tokenizer) are.")
    pre = detect_pre_tokenizer(backend)
    notes = []
    if backend.normalizer is not None:
        notes.append("the HF tokenizer NFC-normalizes text and llama.cpp does not: text that is not already "
                     "NFC may tokenize differently")

    vocab = backend.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1
    if size > n_vocab:
        raise UserError(f"the tokenizer has {size} token ids but the model only {n_vocab} embedding rows "
                        "(config vocab_size); the tokenizer does not belong to this model.")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for text, token_id in vocab.items():
        tokens[token_id], types[token_id] = text, NORMAL
    for token_id, added in backend.get_added_tokens_decoder().items():
        types[token_id] = CONTROL if added.special else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    special_ids = {kind: getattr(hf, f"{kind}_token_id") for kind in ("bos", "eos", "pad", "unk")}
    special_ids = {k: v for k, v in special_ids.items() if v is not None}
    probe = hf("a")["input_ids"]
    return TokenizerMeta(
        pre=pre, tokens=tokens, types=types, merges=merges, special_ids=special_ids,
        add_bos="bos" in special_ids and probe[:1] == [special_ids["bos"]],
        add_eos="eos" in special_ids and probe[-1:] == [special_ids["eos"]],
        chat_template=hf.chat_template if isinstance(hf.chat_template, str) else None,
        padded=n_vocab - len(vocab), notes=notes,
    )
