"""The built-in tokenizer: Qwen2's pre-tokenizer, byte-level round trips, ChatML
specials, and a chat template that ends exactly at the trained EOS."""
import json
import os
import subprocess
import sys

import pytest

from workbench.offline import enforce_offline

enforce_offline()

from workbench import tokenizer as wtok  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return wtok.default_tokenizer()


def _backend_json(t) -> dict:
    return json.loads(t.backend_tokenizer.to_str())


def _default_tokenizer_json_in_a_fresh_process(hash_seed: str) -> str:
    code = ("from workbench.offline import enforce_offline; enforce_offline(); "
            "from workbench import tokenizer as t; import sys; "
            "sys.stdout.write(t.default_tokenizer().backend_tokenizer.to_str())")
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_training_is_deterministic_across_processes():
    # Different hash seeds change set/dict iteration order in Python and Rust alike.
    assert _default_tokenizer_json_in_a_fresh_process("1") == _default_tokenizer_json_in_a_fresh_process("2")


def test_training_twice_in_one_process_gives_the_same_vocab_and_merges():
    texts = ["hello world, hello there", "the theme of the thesis", "x = 10 + 20"] * 5
    a, b = _backend_json(wtok.train_tokenizer(texts, 300)), _backend_json(wtok.train_tokenizer(texts, 300))
    assert a["model"]["vocab"] == b["model"]["vocab"]
    assert a["model"]["merges"] == b["model"]["merges"]
    assert len(a["model"]["merges"]) > 0  # it did learn merges, not only the alphabet


def test_pre_tokenizer_is_exactly_qwen2s_with_byte_level_decoding_and_no_normalizer(tok):
    spec = _backend_json(tok)
    assert spec["normalizer"] is None
    split, byte_level = spec["pre_tokenizer"]["pretokenizers"]
    assert split == {"type": "Split", "pattern": {"Regex": wtok.QWEN2_PATTERN}, "behavior": "Isolated", "invert": False}
    assert byte_level["type"] == "ByteLevel"
    assert byte_level["add_prefix_space"] is False and byte_level["use_regex"] is False
    assert spec["decoder"]["type"] == "ByteLevel"
    assert spec["model"]["type"] == "BPE"


def test_the_byte_alphabet_is_always_in_the_vocab(tok):
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = tok.get_vocab()
    assert set(ByteLevel.alphabet()) <= set(vocab)
    # Even a tokenizer trained on two words keeps all 256 byte symbols.
    small = wtok.train_tokenizer(["ab ab"], 300)
    assert set(ByteLevel.alphabet()) <= set(small.get_vocab())


@pytest.mark.parametrize("text", [
    "plain ASCII text.",
    "Grüße, naïve café — 東京 🙂 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b zero-width",
    "  leading, trailing  ",
    "tabs\t\tand\n\n\nnewlines \r\n crlf     runs",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|><|endoftext|>",
    "never seen: ꙮ ᚠᛇᚻ \U0001f9ec",
])
def test_any_string_round_trips(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_digits_are_single_tokens(tok):
    ids = tok("12345 and 9876", add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("12345") + list("9876")
    # No vocabulary entry holds two digits, so no number is ever merged.
    for token in tok.get_vocab():
        text = tok.convert_tokens_to_string([token])
        assert sum(c.isdigit() for c in text) <= 1, token


def test_special_tokens_are_single_special_ids(tok):
    assert tok.eos_token == wtok.IM_END and tok.pad_token == wtok.PAD_TOKEN and tok.bos_token is None
    for special in wtok.SPECIAL_TOKENS:
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] in tok.all_special_ids, special
        assert tok.added_tokens_decoder[ids[0]].special  # what GGUF converters read as control tokens
    # No BOS/EOS is added around plain text.
    assert tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]
    text = "<|im_start|>user\nhi<|im_end|>"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == "user\nhi"


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "5"},
]


def test_chat_template_renders_chatml_turns_joined_by_newlines(tok):
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\n5<|im_end|>"
    )
    assert tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_nothing_follows_the_final_eos_and_the_prompt_is_a_token_prefix(tok):
    full = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=True, return_dict=True,
                                     add_generation_prompt=True)["input_ids"]
    assert full[-1] == tok.eos_token_id
    assert full.count(tok.eos_token_id) == 3  # one per turn, the last one closes the sequence
    # TRL takes the completion to be what follows the prompt's tokens; a prefix
    # means the completion is exactly "5<|im_end|>".
    assert full[:len(prompt)] == prompt
    assert tok.decode(full[len(prompt):]) == "5<|im_end|>"


def test_saved_tokenizer_reloads_with_template_in_tokenizer_config(tok, tmp_path):
    from transformers import AutoTokenizer

    wtok.save_tokenizer(tok, tmp_path / "tokenizer")
    config = json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == wtok.CHAT_TEMPLATE
    again = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    text = "Reverse the letters: a b c 東京"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.apply_chat_template(CONVERSATION, tokenize=False) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert (again.eos_token, again.pad_token, again.bos_token) == (tok.eos_token, tok.pad_token, None)
    assert not list(tmp_path.glob("*.partial"))


def test_too_small_vocab_is_refused():
    with pytest.raises(ValueError, match="at least 259"):
        wtok.train_tokenizer(["abc"], 100)
