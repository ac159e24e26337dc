"""The shipped lm-eval tasks, their data, and task-name resolution.

The task definitions live in ``eval/tasks/*.yaml`` (shipped in the wheel). Their
data is the run's own held-out split, so an evaluation measures exactly what the
train stage held out:

    RUN/eval/data/synthetic_mc.jsonl    multiple choice (built-in skills only)
    RUN/eval/data/synthetic_gen.jsonl   generation, exact match
    RUN/eval/data/heldout_ppl.jsonl     perplexity documents
    RUN/eval/tasks/*.yaml               the shipped YAML with data_files made absolute

lm-eval resolves relative ``data_files`` against the working directory, so the
copies in RUN/eval/tasks/ name the data by absolute path; that folder is what
lm-eval's TaskManager indexes. It indexes with ``include_defaults=False``
(lm-eval's ~15k built-in tasks take 16-27 s to index) unless a task name is
neither ours nor in a ``--include`` folder.

Multiple-choice and generation rows are written skill by skill in turn (add,
recall, reverse, add, ...), so ``--limit N`` evaluates a mix of skills rather
than the first skill only.
"""
from __future__ import annotations

import json
from pathlib import Path

from workbench import atomic, synthetic
from workbench.errors import UserError

SHIPPED_DIR = Path(__file__).resolve().parent / "tasks"
MC_TASK, GEN_TASK, PPL_TASK = "wb_synthetic_mc", "wb_synthetic_gen", "wb_heldout_ppl"
SHIPPED_TASKS = (MC_TASK, GEN_TASK, PPL_TASK)


def load_test_rows(run: Path, train_record: dict | None) -> tuple[list[dict], str]:
    """The run's held-out rows and where they came from: RUN/data/test.jsonl (the
    train stage writes it), else the built-in split for the recorded seed."""
    path = run / "data" / "test.jsonl"
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not rows:
            raise UserError(f"{path} has no rows; rerun `workbench train` to write the held-out split.")
        return rows, str(path)
    seed = ((train_record or {}).get("dataset") or {}).get("seed", 0)
    return synthetic.build(seed=seed)["test"], f"the built-in synthetic test split, seed {seed} ({path} is missing)"


def interleave(rows: list[dict]) -> list[dict]:
    """Rows taken skill by skill in turn, each skill's rows in their original order."""
    by_skill: dict[str, list[dict]] = {}
    for r in rows:
        by_skill.setdefault(r.get("skill", "all"), []).append(r)
    queues = list(by_skill.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def turn_end(run: Path) -> str | None:
    """What the run's chat template writes after an assistant reply (``<|im_end|>``
    for the built-in one), found the way TRL splits prompt from completion: the
    rendered conversation minus the rendered prompt is the completion, reply
    first. None without a tokenizer or when the template does not render so."""
    from transformers import AutoTokenizer

    folder = run / "tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        return None
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    if not tok.chat_template:
        return None
    marker = "\u2063reply\u2063"   # invisible separators, not whitespace: templates that trim replies keep them
    user = {"role": "user", "content": "question"}
    prompt = tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([user, {"role": "assistant", "content": marker}], tokenize=False)
    if not full.startswith(prompt + marker):
        return None
    return full[len(prompt + marker):]


def default_tasks(run: Path) -> list[str]:
    """The tasks `workbench eval --run DIR` runs without --tasks: every shipped task the run's
    held-out rows have documents for."""
    from workbench import manifest

    rows, _ = load_test_rows(run, manifest.stage(run, "train"))
    counts = {name: len(docs) for name, docs in task_docs(rows).items()}
    return [t for t in SHIPPED_TASKS if counts.get(t)]


def task_docs(rows: list[dict], choice_end: str = "") -> dict[str, list[dict]]:
    """The documents of each shipped task. Multiple choice needs distractors,
    which only the built-in skills define, so it covers those rows only; each
    option is scored with ``choice_end`` (the turn end) after it, so that "1" is
    not favoured over "12" for being its prefix: the model must also stop there.
    A multi-turn prompt is asked as its last user message. Perplexity documents
    keep the split's order: concatenated, they are ``heldout_text()``."""
    mixed = interleave(rows)
    mc = []
    for r in mixed:
        if r.get("skill") in synthetic.SKILLS:
            options, gold = synthetic.choices_for(r)
            mc.append({"question": synthetic.question(r), "choices": [o + choice_end for o in options],
                       "gold": gold, "skill": r["skill"]})
    gen = [{"question": synthetic.question(r), "answer": r["answer"], "skill": r.get("skill", "all")} for r in mixed]
    ppl = [{"text": f"{synthetic.question(r)}\n{r['answer']}\n\n"} for r in rows]
    return {MC_TASK: mc, GEN_TASK: gen, PPL_TASK: ppl}


def _shipped_config(name: str) -> dict:
    import yaml

    return yaml.safe_load((SHIPPED_DIR / f"{name}.yaml").read_text(encoding="utf-8"))


def max_new_tokens(run: Path) -> int | None:
    """The run's eval.max_new_tokens (the train stage's generation budget), if it has a config."""
    import yaml

    path = run / "config.yaml"
    if not path.is_file():
        return None
    value = ((yaml.safe_load(path.read_text()) or {}).get("eval") or {}).get("max_new_tokens")
    return int(value) if value else None


def materialize(eval_dir: Path, rows: list[dict], gen_tokens: int | None = None,
                choice_end: str = "") -> dict[str, int]:
    """Write each shipped task's data and its YAML (data_files absolute; the
    generation task's max_gen_toks set to ``gen_tokens`` if given) under
    ``eval_dir``; returns {task: number of documents}. A task without documents
    gets no YAML, so asking for it is an unknown task."""
    import yaml

    counts = {}
    for name, docs in task_docs(rows, choice_end).items():
        config = _shipped_config(name)
        if gen_tokens and "generation_kwargs" in config:
            config["generation_kwargs"]["max_gen_toks"] = gen_tokens
        data_name = config["dataset_kwargs"]["data_files"]["test"]
        task_file = eval_dir / "tasks" / f"{name}.yaml"
        counts[name] = len(docs)
        if not docs:
            task_file.unlink(missing_ok=True)
            continue
        data_path = synthetic.write_jsonl(docs, eval_dir / "data" / data_name)
        config["dataset_kwargs"]["data_files"]["test"] = str(data_path.resolve())
        atomic.write_text(task_file, f"# Written by `workbench eval` from {SHIPPED_DIR / (name + '.yaml')}.\n"
                          + yaml.safe_dump(config, sort_keys=False))
    return counts


def check_task_folders(folders: list[Path]) -> None:
    """Every task YAML under ``folders`` parses (lm-eval would skip a broken one
    silently, and its task would then look unknown)."""
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"--include {folder} is not a folder; pass a folder of lm-eval task YAML files.")
        for path in sorted(folder.glob("**/*.yaml")):
            try:
                load_yaml(path, resolve_func=False)
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f" at line {mark.line + 1}" if mark else ""
                raise UserError(f"task file {path} is not valid YAML{where} "
                                f"({getattr(err, 'problem', None) or 'syntax error'}); fix its syntax.") from None
            except (ValueError, OSError) as err:
                raise UserError(f"task file {path} cannot be read as an lm-eval task ({err}); it must be a "
                                "YAML mapping, and every file it includes must exist.") from None


def task_manager(names: list[str], include: list[Path]):
    """An lm-eval TaskManager that knows every name in ``names`` (UserError naming
    the unknown ones otherwise)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(p) for p in include], include_defaults=False)
    unknown = [n for n in names if n not in manager.all_tasks]
    if not unknown:
        return manager
    ours = manager.all_tasks
    manager = TaskManager(include_path=[str(p) for p in include], include_defaults=True)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}; available here: {', '.join(ours)} "
                        "(add folders of task YAML with --include, or name one of lm-eval's built-in tasks).")
    return manager


def load_tasks(manager, names: list[str]) -> None:
    """Build every task once before any model runs, so a task whose dataset is not
    available offline, or whose definition is wrong, fails in seconds."""
    try:
        manager.load(names)
    except Exception as err:  # lm-eval and datasets raise many types here; all mean the same to the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not build task(s) {', '.join(names)}: {first[:300]}. Evaluation runs offline: "
                        "a task's dataset must be a local file or already in the Hugging Face cache.") from None
