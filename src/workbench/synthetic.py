"""The built-in synthetic instruction data: three skills a model of a few million
parameters can learn in minutes on a CPU, each with an exact answer so accuracy means
something.

Rows are chat prompt/completion pairs (TRL's conversational prompt/completion
format) plus the skill name and the expected answer::

    {"prompt": [{"role": "user", "content": "What is 3 plus 4?"}],
     "completion": [{"role": "assistant", "content": "7"}],
     "skill": "add", "answer": "7"}

What "held-out" means for each skill (no test prompt ever occurs in train; tested):

* ``add`` — single-digit a + b asked in one of four phrasings. Every pair is in
  train, but each pair's test phrasing is one that pair never appears with in
  train (the phrasing itself is seen with other pairs). The test asks for a
  known sum in an unseen wording: it measures that the model reads the numbers
  rather than memorising prompt strings.
* ``recall`` — a fixed table of invented planets and their colours. A fact cannot
  be recalled if it was never taught, so train covers every planet; the test asks
  each planet in a phrasing held out for it, as for ``add``.
* ``reverse`` — reverse a short letter string written with spaces between the
  letters (so each letter is its own token). Test strings never occur in train:
  this is the one skill where the items themselves are held out.

Everything is a pure function of the seed: the same call gives the same rows.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import string
from pathlib import Path

from workbench import atomic

SKILLS = ("add", "recall", "reverse")

ADD_PHRASINGS = (
    "What is {a} plus {b}?",
    "Add {a} and {b}.",
    "Compute {a} + {b}.",
    "How much is {b} added to {a}?",
)
RECALL_PHRASINGS = (
    "What color is the planet {k}?",
    "Tell me the color of planet {k}.",
    "Planet {k} has which color?",
    "Which color belongs to {k}?",
)
REVERSE_PHRASINGS = (
    "Reverse the letters: {w}",
    "Write these letters backwards: {w}",
)
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")

N_PLANETS = 16
N_REVERSE_TRAIN = 1200
N_REVERSE_TEST = 40
TRAIN_ROWS = 3000


def _row(skill: str, question: str, answer: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": question}],
        "completion": [{"role": "assistant", "content": answer}],
        "skill": skill,
        "answer": answer,
    }


def planets(seed: int = 0) -> dict[str, str]:
    """The recall table: invented planet name -> colour (consonant-vowel syllables)."""
    rng = random.Random(f"planets-{seed}")
    names: list[str] = []
    while len(names) < N_PLANETS:
        name = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(2)).capitalize()
        if name not in names:
            names.append(name)
    return {name: COLORS[i % len(COLORS)] for i, name in enumerate(names)}


def _spaced(word: str) -> str:
    return " ".join(word)


def _reverse_words(seed: int) -> tuple[list[str], list[str]]:
    """Disjoint train and test letter strings of length 3-4."""
    rng = random.Random(f"reverse-{seed}")
    seen: set[str] = set()
    words: list[str] = []
    while len(words) < N_REVERSE_TRAIN + N_REVERSE_TEST:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.choice((3, 4))))
        if w not in seen and w != w[::-1]:  # a palindrome's answer would equal its input
            seen.add(w)
            words.append(w)
    return words[N_REVERSE_TEST:], words[:N_REVERSE_TEST]


def _phrased_split(items: list[tuple[str, dict]], phrasings: tuple[str, ...], skill: str,
                   answer_of, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Each item gets one held-out phrasing (rotating, so every phrasing is held out
    for some items and trained with the others); the rest go to train."""
    train, test = [], []
    for i, (key, fields) in enumerate(items):
        held = (i + rng.randrange(len(phrasings))) % len(phrasings)
        for j, template in enumerate(phrasings):
            row = _row(skill, template.format(**fields), answer_of(key))
            (test if j == held else train).append(row)
    return train, test


def build(seed: int = 0, train_rows: int = TRAIN_ROWS) -> dict[str, list[dict]]:
    """{"train": [...], "test": [...]} for the given seed.

    Train is ``train_rows`` rows drawn evenly across the skills (the add and recall
    pools are small, so their rows repeat) and shuffled; test holds every held-out
    row, in a fixed order grouped by skill.
    """
    rng = random.Random(f"build-{seed}")
    add_items = [((a, b), {"a": a, "b": b}) for a in range(10) for b in range(10)]
    add_train, add_test = _phrased_split(add_items, ADD_PHRASINGS, "add", lambda k: str(k[0] + k[1]), rng)

    table = planets(seed)
    recall_items = [(k, {"k": k}) for k in table]
    recall_train, recall_test = _phrased_split(recall_items, RECALL_PHRASINGS, "recall", table.__getitem__, rng)

    train_words, test_words = _reverse_words(seed)
    rev_train = [_row("reverse", rng.choice(REVERSE_PHRASINGS).format(w=_spaced(w)), _spaced(w[::-1]))
                 for w in train_words]
    rev_test = [_row("reverse", rng.choice(REVERSE_PHRASINGS).format(w=_spaced(w)), _spaced(w[::-1]))
                for w in test_words]

    pools = [add_train, recall_train, rev_train]
    train = [pools[i % len(pools)][(i // len(pools)) % len(pools[i % len(pools)])] for i in range(train_rows)]
    rng.shuffle(train)
    return {"train": train, "test": add_test + recall_test + rev_test}


def question(row: dict) -> str:
    """The user's question of a row (its last user message)."""
    return [m for m in row["prompt"] if m["role"] == "user"][-1]["content"]


def score(prediction: str, answer: str) -> bool:
    """Exact match after stripping surrounding whitespace."""
    return prediction.strip() == answer.strip()


def wrong_answers(row: dict) -> list[str]:
    """Wrong answers of the row's own skill, in a fixed order: every other sum of two
    digits (add), every other colour (recall), or the string as given (not reversed)
    followed by every one-letter change of the answer (reverse)."""
    answer = row["answer"]
    if row["skill"] == "add":
        return [str(v) for v in range(19) if str(v) != answer]
    if row["skill"] == "recall":
        return [c for c in COLORS if c != answer]
    letters = answer.split(" ")
    pool = [" ".join(reversed(letters))]
    for i, c in enumerate(letters):
        pool += [" ".join(letters[:i] + [o] + letters[i + 1:]) for o in string.ascii_lowercase if o != c]
    return list(dict.fromkeys(p for p in pool if p != answer))


def choices_for(row: dict, n: int = 4) -> tuple[list[str], int]:
    """A multiple-choice view of a row: ``n`` distinct options including the right
    answer, and the index of the right one. Distractors and order depend only on
    the row, so every evaluator sees the same question."""
    answer = row["answer"]
    rng = random.Random(hashlib.sha256(question(row).encode()).hexdigest())
    distractors = rng.sample(wrong_answers(row), n - 1)
    options = distractors + [answer]
    rng.shuffle(options)
    return options, options.index(answer)


def plausible_wrong_answer(row: dict, rng: random.Random) -> str:
    """One wrong answer a learner of the row's skill could give: a sum off by one to three
    (add), another of the table's colours (recall), the string not reversed or the answer with one
    letter changed, the first half of the time the former (reverse)."""
    pool = wrong_answers(row)
    if row["skill"] == "add":
        near = [w for w in pool if 0 < abs(int(w) - int(row["answer"])) <= 3]
        return rng.choice(near)
    if row["skill"] == "reverse" and rng.random() < 0.5:
        return pool[0]
    return rng.choice(pool)


def preference_pair(row: dict, rng: random.Random) -> dict:
    """A row as a preference pair (TRL's conversational preference format): the same
    prompt, ``chosen`` the correct answer, ``rejected`` a plausible wrong one of the same
    skill; ``skill`` and ``answer`` kept."""
    return {
        "prompt": row["prompt"],
        "chosen": [{"role": "assistant", "content": row["answer"]}],
        "rejected": [{"role": "assistant", "content": plausible_wrong_answer(row, rng)}],
        "skill": row["skill"],
        "answer": row["answer"],
    }


def build_preference(seed: int = 0, train_rows: int = TRAIN_ROWS) -> dict[str, list[dict]]:
    """The preference split of the built-in data: :func:`build`'s train and test rows, in
    the same order, as prompt/chosen/rejected pairs (:func:`preference_pair`). A pure
    function of the seed, like :func:`build`; the held-out guarantees carry over, since the
    prompts are build's."""
    split = build(seed, train_rows)
    rng = random.Random(f"preference-{seed}")
    return {name: [preference_pair(r, rng) for r in rows] for name, rows in split.items()}


def heldout_text(seed: int = 0) -> str:
    """Plain text (question, answer, blank line) from the test split, for perplexity:
    the same distribution as training, none of it trained on."""
    return "".join(f"{question(r)}\n{r['answer']}\n\n" for r in build(seed)["test"])


def tokenizer_corpus(seed: int = 0) -> list[str]:
    """Texts the built-in tokenizer is trained on: the train split only."""
    return [f"{question(r)}\n{r['answer']}" for r in build(seed)["train"]]


def jsonl_text(rows: list[dict]) -> str:
    """Rows as JSON lines: what :func:`write_jsonl` writes (and the train stage hashes)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write rows as JSON lines, atomically."""
    return atomic.write_text(path, jsonl_text(rows))
