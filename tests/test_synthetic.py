"""The synthetic instruction data: deterministic, held out without leakage, exact answers."""
import json
import random
import re

import pytest

from workbench import synthetic


def _planet(question: str) -> str:
    (name,) = [k for k in synthetic.planets() if re.search(rf"\b{k}\b", question)]
    return name


@pytest.fixture(scope="module")
def split():
    return synthetic.build()


def test_build_is_deterministic_and_depends_on_the_seed(split):
    assert synthetic.build() == split
    assert synthetic.build(seed=1) != split


def test_rows_are_chat_prompt_completion_with_skill_and_answer(split):
    for row in split["train"] + split["test"]:
        assert set(row) == {"prompt", "completion", "skill", "answer"}
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert row["completion"] == [{"role": "assistant", "content": row["answer"]}]
        assert row["skill"] in synthetic.SKILLS


def test_no_test_prompt_occurs_in_train(split):
    train_prompts = {synthetic.question(r) for r in split["train"]}
    leaked = [synthetic.question(r) for r in split["test"] if synthetic.question(r) in train_prompts]
    assert leaked == []


def test_reverse_test_strings_never_occur_in_train(split):
    def letters(row):
        return synthetic.question(row).split(": ", 1)[1]

    train = {letters(r) for r in split["train"] if r["skill"] == "reverse"}
    test = [letters(r) for r in split["test"] if r["skill"] == "reverse"]
    assert test and not set(test) & train


def test_add_and_recall_test_items_are_taught_in_train_in_other_phrasings(split):
    # Held-out phrasing, not held-out facts: every test item's answer is trained
    # for the same numbers / planet in at least one other phrasing.
    def item(row):
        if row["skill"] == "add":
            return tuple(re.findall(r"\d+", synthetic.question(row)))
        return _planet(synthetic.question(row))

    for skill in ("add", "recall"):
        trained = {(item(r), r["answer"]) for r in split["train"] if r["skill"] == skill}
        test = [r for r in split["test"] if r["skill"] == skill]
        assert test
        for r in test:
            # "How much is b added to a" swaps the operands; addition's answer is the same.
            keys = {item(r), item(r)[::-1]} if skill == "add" else {item(r)}
            assert any((k, r["answer"]) in trained for k in keys), synthetic.question(r)


def test_answers_are_correct(split):
    table = synthetic.planets()
    for row in split["train"] + split["test"]:
        q = synthetic.question(row)
        if row["skill"] == "add":
            a, b = map(int, re.findall(r"\d+", q))
            assert row["answer"] == str(a + b)
        elif row["skill"] == "recall":
            assert row["answer"] == table[_planet(q)]
        else:
            assert row["answer"] == " ".join(q.split(": ", 1)[1].split(" ")[::-1])


def test_every_skill_is_trained_in_balance(split):
    counts = {s: sum(r["skill"] == s for r in split["train"]) for s in synthetic.SKILLS}
    assert max(counts.values()) - min(counts.values()) <= 1
    assert sum(counts.values()) == synthetic.TRAIN_ROWS


def test_score_is_exact_match_after_stripping():
    assert synthetic.score(" 12\n", "12")
    assert not synthetic.score("12.0", "12")
    assert not synthetic.score("1 2", "12")


def test_choices_hold_the_answer_once_among_distinct_options(split):
    for row in split["test"]:
        options, correct = synthetic.choices_for(row)
        assert len(options) == 4 == len(set(options))
        assert options[correct] == row["answer"] and options.count(row["answer"]) == 1
        assert synthetic.choices_for(row) == (options, correct)  # deterministic
    positions = {synthetic.choices_for(r)[1] for r in split["test"]}
    assert positions == {0, 1, 2, 3}  # the right answer is not always in the same place


def test_heldout_text_comes_from_the_test_split_only(split):
    text = synthetic.heldout_text()
    assert text == synthetic.heldout_text()
    for row in split["test"]:
        assert f"{synthetic.question(row)}\n{row['answer']}\n" in text
    train_only = {synthetic.question(r) for r in split["train"]}
    assert not any(line in train_only for line in text.splitlines())


def test_write_jsonl_round_trips(split, tmp_path):
    path = synthetic.write_jsonl(split["test"], tmp_path / "test.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == split["test"]
    assert not list(tmp_path.glob("*.partial"))


@pytest.fixture(scope="module")
def pairs():
    return synthetic.build_preference()


def test_preference_split_is_deterministic_and_depends_on_the_seed(pairs):
    assert synthetic.build_preference() == pairs
    other = synthetic.build_preference(seed=1)
    assert [r["prompt"] for r in other["train"]] != [r["prompt"] for r in pairs["train"]]
    # The wrong answers come from the seeded draw too, not only the prompts.
    redrawn = [synthetic.preference_pair(r, random.Random("another draw")) for r in synthetic.build()["train"][:200]]
    assert [r["rejected"] for r in redrawn] != [r["rejected"] for r in pairs["train"][:200]]


def test_preference_pairs_are_build_rows_with_the_right_answer_chosen(split, pairs):
    for name in ("train", "test"):
        assert len(pairs[name]) == len(split[name])
        for row, pair in zip(split[name], pairs[name]):
            assert set(pair) == {"prompt", "chosen", "rejected", "skill", "answer"}
            assert pair["prompt"] == row["prompt"] and pair["skill"] == row["skill"]
            assert pair["chosen"] == row["completion"] == [{"role": "assistant", "content": row["answer"]}]
            assert [m["role"] for m in pair["rejected"]] == ["assistant"]


def test_rejected_is_a_plausible_wrong_answer_of_the_same_skill(pairs):
    kinds = {"add": set(), "reverse": set()}
    for pair in pairs["train"] + pairs["test"]:
        wrong, answer = pair["rejected"][0]["content"], pair["answer"]
        assert wrong != answer and not synthetic.score(wrong, answer)
        assert wrong in synthetic.wrong_answers(pair)
        if pair["skill"] == "add":
            assert 1 <= abs(int(wrong) - int(answer)) <= 3  # a near miss, not any number
            kinds["add"].add(int(wrong) - int(answer))
        elif pair["skill"] == "recall":
            assert wrong in synthetic.COLORS
        else:  # the same number of spaced letters: the string unreversed, or one letter changed
            assert len(wrong.split(" ")) == len(answer.split(" "))
            unreversed = wrong == " ".join(answer.split(" ")[::-1])
            changed = sum(a != b for a, b in zip(wrong.split(" "), answer.split(" "))) == 1
            assert unreversed or changed
            kinds["reverse"].add("unreversed" if unreversed else "changed")
    assert kinds["add"] == {-3, -2, -1, 1, 2, 3}
    assert kinds["reverse"] == {"unreversed", "changed"}
