"""Training data: the user's rows (jsonl or parquet, chat "messages" or prompt/completion)
or the built-in synthetic skills, as chat prompt/completion rows; the held-out split; and
the tokenized, labelled (completion-only) and packed dataset the trainer takes.

For preference training (``training.method`` dpo or orpo) the rows are prompt/chosen/rejected
pairs (TRL's conversational preference format), and the held-out rows also carry the chosen
reply as their ``completion``: the later stages (eval, export's Modelfile check, qualify) read
them as they read SFT rows, the chosen reply being the expected answer.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from workbench import synthetic
from workbench.config import Config
from workbench.distributed import log
from workbench.errors import UserError, reason

PROMPT_COMPLETION = ("prompt", "completion")
PREFERENCE = ("prompt", "chosen", "rejected")
#: Message roles a row may use (the chat templates and the held-out eval know these).
ROLES = ("system", "user", "assistant")
MESSAGES = ("messages",)


def read_file(path: str) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"dataset file {p} is a folder; set data.train / data.test to .jsonl or .parquet files.")
    if not p.is_file():
        raise UserError(f"dataset file {p} does not exist; check data.train / data.test in the config.")
    if p.suffix == ".jsonl":
        rows = []
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            line = p.read_bytes()[:err.start].count(b"\n") + 1
            raise UserError(f"{p} is not UTF-8 text (byte 0x{err.object[err.start]:02x} on line {line}); save it as "
                            "UTF-8 (e.g. iconv -f latin1 -t utf-8).") from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{p} line {n} is not valid JSON ({err.msg}); each line must be one JSON object.") from None
            if not isinstance(rows[-1], dict):
                raise UserError(f"{p} line {n} is not a JSON object; each line must be one row like "
                                '{"prompt": ..., "completion": ...}.')
    elif p.suffix == ".parquet":
        import pandas as pd

        try:
            rows = pd.read_parquet(p).to_dict(orient="records")
        except Exception as err:   # pyarrow raises its own kinds (ArrowInvalid, ...) for a file that is no parquet
            raise UserError(f"{p} is not a readable parquet file ({reason(err)}); write it with pandas' to_parquet, "
                            "or give a .jsonl file.") from None
    else:
        raise UserError(f"dataset file {p} is neither .jsonl nor .parquet; convert it to one of those.")
    if not rows:
        raise UserError(f"dataset file {p} has no rows.")
    return rows


def _messages(value, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    value = list(value) if hasattr(value, "__len__") and not isinstance(value, dict) else value
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        raise UserError(f"{where} must be a string or a non-empty list of {{role, content}} messages.")
    unknown = [m["role"] for m in value if m["role"] not in ROLES]
    if unknown:
        raise UserError(f"{where} has a message with role {unknown[0]!r}; the roles are {', '.join(ROLES)} (rename "
                        "it, e.g. human to user).")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def normalize_rows(rows: list[dict], path: str) -> list[dict]:
    """Rows in messages or prompt/completion format -> chat prompt/completion rows
    with "answer" (the assistant's reply, the exact-match target) and "skill"."""
    columns = set().union(*(r.keys() for r in rows))
    if set(PROMPT_COMPLETION) <= columns:
        fmt = "prompt/completion"
    elif set(MESSAGES) <= columns:
        fmt = "messages"
    else:
        raise UserError(f"dataset {path} has columns {', '.join(sorted(map(str, columns)))}; expected 'messages' "
                        "(a chat ending with the assistant's reply) or 'prompt' and 'completion'.")
    out = []
    for i, row in enumerate(rows):
        where = f"{path} row {i + 1}"
        if fmt == "messages":
            msgs = _messages(row.get("messages"), f"{where} 'messages'")
            if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
                raise UserError(f"{where}: a 'messages' chat must have a prompt and end with an assistant message "
                                "(the reply that is trained).")
            prompt, completion = msgs[:-1], msgs[-1:]
        else:
            prompt = _messages(row.get("prompt"), f"{where} 'prompt'")
            completion = row.get("completion")
            completion = ([{"role": "assistant", "content": completion}] if isinstance(completion, str)
                          else _messages(completion, f"{where} 'completion'"))
        if not any(m["role"] == "user" for m in prompt):
            raise UserError(f"{where}: the prompt has no user message (the held-out eval asks each row's last user "
                            "message); give every prompt one.")
        answer = row.get("answer")
        answer = answer if isinstance(answer, str) else "".join(m["content"] for m in completion)
        out.append({"prompt": prompt, "completion": completion, "skill": str(row.get("skill") or "all"),
                    "answer": answer})
    return out


def _reply(value, where: str) -> list[dict]:
    """A reply (a string, or assistant messages) as assistant messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    msgs = _messages(value, where)
    if any(m["role"] != "assistant" for m in msgs):
        raise UserError(f"{where} must be the assistant's reply (a string or assistant messages), not a chat with "
                        "other roles; put the conversation before it in 'prompt'.")
    return msgs


def normalize_preference_rows(rows: list[dict], path: str, method: str) -> list[dict]:
    """Rows with prompt, chosen and rejected (strings, or chat messages: TRL's conversational
    preference format) -> chat prompt/chosen/rejected rows with "answer" (the chosen reply, the
    held-out eval's target) and "skill"."""
    columns = set().union(*(r.keys() for r in rows))
    missing = [c for c in PREFERENCE if c not in columns]
    if missing:
        raise UserError(f"dataset {path} has no {missing[0]!r} column (it has {', '.join(sorted(map(str, columns)))}); "
                        f"training.method {method} trains on preference pairs: give every row 'prompt', 'chosen' and "
                        "'rejected' (strings or chat messages), or set training.method: sft.")
    out = []
    for i, row in enumerate(rows):
        where = f"{path} row {i + 1}"
        prompt = _messages(row.get("prompt"), f"{where} 'prompt'")
        if not any(m["role"] == "user" for m in prompt):
            raise UserError(f"{where}: the prompt has no user message (the held-out eval asks each row's last user "
                            "message); give every prompt one.")
        chosen = _reply(row.get("chosen"), f"{where} 'chosen'")
        rejected = _reply(row.get("rejected"), f"{where} 'rejected'")
        answer = row.get("answer")
        answer = answer if isinstance(answer, str) else "".join(m["content"] for m in chosen)
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "skill": str(row.get("skill") or "all"),
                    "answer": answer})
    return out


def load_paths(paths, method: str = "sft") -> list[dict]:
    rows = []
    for p in [paths] if isinstance(paths, str) else paths:
        rows += (normalize_rows(read_file(p), p) if method == "sft"
                 else normalize_preference_rows(read_file(p), p, method))
    return rows


def with_completion(rows: list[dict]) -> list[dict]:
    """Preference rows with their chosen reply as ``completion`` too (what the later stages read)."""
    return [{**r, "completion": r["chosen"]} for r in rows]


def load_data(cfg: Config) -> dict:
    """{"train": rows, "test": rows, "info": {...}}. User data without a test file
    is split with ``data.eval_fraction`` (seeded); train rows whose prompt is also a
    test prompt are dropped so the test stays held out."""
    d, method = cfg.data, cfg.training.method
    if cfg.builtin_data:
        if method == "sft":
            split = synthetic.build(seed=d.seed, train_rows=d.builtin_rows)
            return {**split, "info": {"source": "builtin", "seed": d.seed, "format": "prompt/completion"}}
        split = synthetic.build_preference(seed=d.seed, train_rows=d.builtin_rows)
        return {"train": split["train"], "test": with_completion(split["test"]),
                "info": {"source": "builtin", "seed": d.seed, "format": "prompt/chosen/rejected"}}
    train = load_paths(d.train, method)
    if d.test is not None:
        test = load_paths(d.test, method)
    else:
        order = list(range(len(train)))
        random.Random(d.seed).shuffle(order)
        n_test = max(1, round(len(train) * d.eval_fraction))
        if n_test >= len(train):
            raise UserError(f"data.train has {len(train)} row(s), too few to split off a test set; add rows or "
                            "give data.test.")
        test = [train[i] for i in order[:n_test]]
        train = [train[i] for i in sorted(order[n_test:])]
    held = {json.dumps(r["prompt"], sort_keys=True) for r in test}
    kept = [r for r in train if json.dumps(r["prompt"], sort_keys=True) not in held]
    if not kept:
        raise UserError("every training prompt also occurs in the test data; give data.test rows that are held out.")
    info = {"source": d.train, "test_source": d.test, "seed": d.seed,
            "dropped_train_rows_in_test": len(train) - len(kept)}
    if method != "sft":
        info["format"] = "prompt/chosen/rejected"
        test = with_completion(test)
    return {"train": kept, "test": test, "info": info}



def packing_strategy(packing) -> str:
    return packing if isinstance(packing, str) else "bfd"  # true: TRL's default


def training_dataset(cfg: Config, tok, rows: list[dict], stats: dict | None = None):
    """The training rows as TRL's SFTTrainer prepares them, prepared here once for every
    stack: ``input_ids`` and ``labels`` (-100 but on the answer and its EOS), packed as
    ``training.packing`` says (bfd adds ``seq_lengths``). sft_config tells TRL to take them
    as they are.

    Step for step as TRL 1.15 and 1.16 (``SFTTrainer._prepare_dataset``), so every stack gets
    exactly what TRL made of the same rows: the prompt (with the generation prompt) and the
    whole chat tokenized by the chat template; the answer starts where the two first differ;
    unpacked rows cut to max_seq_len (keeping the start) and dropped when no target is left;
    packing by TRL's ``pack_dataset`` in this process.

    One deliberate difference, for ``wrapped`` (the benchmarks' packing, whose promise is
    sequences of exactly max_seq_len): TRL wraps each 1000-row map batch on its own, leaving a
    shorter sequence where each batch ends, and at a max_seq_len beyond 1000 rows' tokens
    (~27K built-in tokens) every sequence is such a remainder. Here the rows are wrapped in one
    batch and the one remainder at the end is dropped when a full sequence exists.

    Rows longer than max_seq_len are said, with how many: unpacked, they are cut (and left out
    when no answer token is left); bfd packing cuts them too. ``stats`` (a dict) gets the counts.

    Preference rows (training.method dpo or orpo): :func:`preference_dataset`."""
    import datasets
    from trl import pack_dataset

    t = cfg.training
    if t.method != "sft":
        return preference_dataset(cfg, tok, rows, stats)
    ids_rows, label_rows, renders_apart, too_long, dropped = [], [], 0, 0, 0
    for row in rows:
        prompt = tok.apply_chat_template(row["prompt"], tokenize=True, return_dict=True,
                                         add_generation_prompt=True)["input_ids"]
        ids = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=True,
                                      return_dict=True)["input_ids"]
        start = 0
        while start < min(len(prompt), len(ids)) and prompt[start] == ids[start]:
            start += 1
        renders_apart += start < len(prompt)
        labels = [-100] * start + ids[start:]
        too_long += len(ids) > t.max_seq_len
        if not t.packing:  # packing cuts at max_seq_len itself
            ids, labels = ids[:t.max_seq_len], labels[:t.max_seq_len]
            if all(label == -100 for label in labels):
                dropped += 1
                continue
        ids_rows.append(ids)
        label_rows.append(labels)
    if renders_apart:
        log(f"note: in {renders_apart} row(s) the chat template renders the prompt alone otherwise than before "
             "its answer; there the targets start where the two first differ (as in TRL)")
    if stats is not None:
        stats.update(rows=len(rows), longer_than_max_seq_len=too_long, dropped_no_answer_token=dropped)
    if not ids_rows:
        raise UserError(f"training.max_seq_len ({t.max_seq_len} tokens) leaves no answer token in any training row "
                        "(the prompts fill it); raise training.max_seq_len.")
    if too_long and t.packing != "wrapped":
        log(f"note: {too_long} of {len(rows)} training row(s) are longer than training.max_seq_len "
             f"({t.max_seq_len} tokens) and were cut to it"
             + (f"; {dropped} of them kept no answer token and are left out" if dropped else "")
             + "; raise training.max_seq_len to train on them whole")
    datasets.disable_progress_bars()
    data = datasets.Dataset.from_dict({"input_ids": ids_rows, "labels": label_rows})
    if not t.packing:
        return data
    if t.packing != "wrapped":
        return pack_dataset(data, t.max_seq_len, packing_strategy(t.packing))
    packed = pack_dataset(data, t.max_seq_len, "wrapped", map_kwargs={"batch_size": len(data)})
    if len(packed) > 1 and len(packed[len(packed) - 1]["input_ids"]) < t.max_seq_len:
        packed = packed.select(range(len(packed) - 1))
    return packed


def preference_dataset(cfg: Config, tok, rows: list[dict], stats: dict | None = None):
    """The preference pairs as TRL's DPO and ORPO trainers take them (prompt, chosen, rejected;
    they tokenize the pairs themselves), without the pairs that would train nothing: those whose
    prompt alone fills training.max_seq_len, so that cutting them there leaves no chosen or
    rejected token (TRL's DPOTrainer drops them too; its ORPOTrainer would train on them).
    Where the prompt ends is found as TRL's DPOTrainer finds it: where the rendered prompt (with
    the generation prompt) and the rendered prompt + reply first differ, for either reply.
    Counted in ``stats`` as training_dataset counts: pairs longer than max_seq_len (cut by
    the trainer) and pairs left out."""
    import datasets

    t = cfg.training

    def ids(messages, **kwargs):
        return tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]

    kept, too_long = [], 0
    for row in rows:
        prompt = ids(row["prompt"], add_generation_prompt=True)
        start, longest = len(prompt), 0
        for reply in (row["chosen"], row["rejected"]):
            full = ids(row["prompt"] + reply)
            same = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
            start, longest = min(start, same), max(longest, len(full))
        too_long += longest > t.max_seq_len
        if start < t.max_seq_len:
            kept.append({k: row[k] for k in PREFERENCE})
    if stats is not None:
        stats.update(rows=len(rows), longer_than_max_seq_len=too_long, dropped_no_answer_token=len(rows) - len(kept))
    if not kept:
        raise UserError(f"training.max_seq_len ({t.max_seq_len} tokens) leaves no chosen or rejected token in any "
                        "training pair (the prompts fill it); raise training.max_seq_len.")
    if too_long or len(kept) < len(rows):
        log(f"note: {too_long} of {len(rows)} training pair(s) are longer than training.max_seq_len "
            f"({t.max_seq_len} tokens) and are cut to it"
            + (f"; {len(rows) - len(kept)} pair(s) whose prompt fills it are left out" if len(kept) < len(rows) else "")
            + "; raise training.max_seq_len to train on them whole")
    datasets.disable_progress_bars()
    return datasets.Dataset.from_list(kept)


#: Micro-batches fingerprinted at the start of training (see :func:`batch_fingerprint`). Each
#: costs one host sync. In train-suite runs of 15 steps or more, all three fall in the warm-up
#: that the suite leaves out of its steady speed. In shorter runs (the 8B rows' 10 steps: warm-up
#: to step 2) the third falls in a timed step, at the cost of one sync per run.
FINGERPRINT_BATCHES = 3


def batch_fingerprint(inputs) -> dict:
    """What one training micro-batch holds, as four integers that do not depend on how its
    rows are laid out (B padded rows, or one padding-free row of B concatenated sequences):
    the real input tokens and the sum of their ids, and the loss targets (labels after the
    one-token shift that are not -100) and the sum of their ids. Two stacks fed the same
    tokens with the same labels give equal fingerprints; unequal ones prove they were not
    (other tokens, another label mask), whatever the stacks compute with them. Sums, not
    hashes, so that a row order or a packing layout does not matter; equal sums are strong
    evidence of equal data, not a proof."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    real = mask.bool() if mask is not None else ids.new_ones(ids.shape, dtype=bool)
    out = {"tokens": int(real.sum()), "token_sum": int(ids[real].sum())}
    labels = inputs.get("labels")
    if labels is not None:
        targets = labels[..., 1:]
        kept = targets != -100
        out.update(targets=int(kept.sum()), target_sum=int(targets[kept].sum()))
    return out
