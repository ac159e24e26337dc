"""The stage contract: what every stage of a run declares, and the one way its record is kept.

A stage (train, merge, export, eval, report) is a function that reads artifacts of the run
and writes new ones. Its module declares a :class:`Stage`:

    name       its key in the manifest ("train")
    inputs     inputs(run, settings) -> {input: what the stage reads}: a Path (hashed as a
               file or a folder tree), a str (hashed as text) or any other JSON value (hashed
               as canonical JSON); None for an artifact that is not available
    upstream   {input: the stage that made it}: which inputs are artifacts of earlier stages
    outputs    outputs(run, settings) -> the files and folders it writes
    run        run(run, settings) -> its result (the function its own command calls)
    summary    summary(run, result) -> the line `workbench run` prints after the stage ran

:func:`record` hashes a stage's inputs and writes its manifest record the same way for
every stage. The questions asked of a record are answered here, from the declarations:

* :func:`why_run` (the pipeline's resume and skip): is the record settled, are its input
  hashes those of what the stage would read now, are its outputs intact?
* :func:`changed_inputs` (the report's staleness): which inputs made by an earlier stage
  changed since the record was written?
* :meth:`Stage.drift` (qualify's hash gate): which recorded inputs are no longer what the
  stage read?

So adding an input to a stage is a change in that stage's ``inputs`` only.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from workbench import manifest

#: The pipeline's stages, in order, and the module that declares each (as ``STAGE``).
PIPELINE = {"train": "workbench.train", "merge": "workbench.export.merge", "export": "workbench.export.stage",
            "eval": "workbench.eval.run", "report": "workbench.report"}
NAMES = tuple(PIPELINE)


def get(name: str) -> "Stage":
    """The declared stage ``name`` (importing its module)."""
    stage = importlib.import_module(PIPELINE[name]).STAGE
    assert stage.name == name, (stage.name, name)
    return stage


def pipeline() -> list["Stage"]:
    return [get(name) for name in NAMES]


@dataclass
class Settings:
    """What a command asks of the stages; each stage reads the fields that concern it."""

    cfg: object = None                         # train: the Config (None: the run's config.yaml, else the default)
    quants: tuple | list | None = None         # export: the GGUF types asked for (None: the pipeline's default)
    thresholds: str | Path | None = None       # export: a thresholds file (None: the defaults)
    adapter_gguf: bool = False                 # export: the adapter as a GGUF LoRA adapter too (`workbench run`)
    eval_limit: int | None = None              # eval: documents per task (None: all)
    eval_tasks: list | None = None             # eval: lm-eval tasks (None: the shipped ones the run has rows for)
    eval_models: list | None = None            # eval: model kinds (None: every one the run has)
    include: tuple | list = ()                 # eval: folders of extra task YAMLs
    chat_template: bool = True                 # eval: prompts through the tokenizer's chat template
    tolerances: str | Path | None = None       # eval: a tolerances file (None: the defaults)
    command: str | None = None                 # report: the command line it names


# --------------------------------------------------------------------------- hashing and recording
def digest(thing) -> str | None:
    """The sha256 of one input: a Path's file or folder tree (None when it is not there), a
    str's text, any other value's canonical JSON (sorted keys; None is JSON's null)."""
    if isinstance(thing, Path):
        return manifest.hash_tree(thing) if thing.exists() else None
    text = thing if isinstance(thing, str) else json.dumps(thing, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hashes(found: dict) -> dict:
    return {key: digest(thing) for key, thing in found.items()}


def describe(run: Path, found: dict) -> dict:
    """The record's ``inputs``: where each path input is (relative to the run when inside it)."""
    return {key: manifest.relative(run, thing) for key, thing in found.items() if isinstance(thing, Path)}


def record(run: str | Path, stage: "Stage", settings: Settings | None, fields: dict, *, found: dict | None = None,
           hashed: dict | None = None, outputs: list | None = None) -> dict:
    """Write ``stage``'s manifest record: its inputs (``found``, default: what it declares now)
    with their hashes (``hashed``, default: hashed now), ``fields``, and its outputs (default:
    what it declares) with theirs. Returns the record."""
    run = Path(run)
    settings = settings or Settings()
    found = stage.inputs(run, settings) if found is None else found
    hashed = hashes(found) if hashed is None else hashed
    outputs = stage.outputs(run, settings) if outputs is None else outputs
    return manifest.record_stage(run, stage.name, {"inputs": describe(run, found), "input_hashes": hashed, **fields,
                                                   "outputs": manifest.outputs_record(run, outputs)})


# --------------------------------------------------------------------------- asking a record
def changed_inputs(run: Path, stage: "Stage", settings: Settings | None = None, *, strict: bool = True,
                   upstream_only: bool = False) -> list[str]:
    """The inputs whose hash in ``stage``'s record is not the hash of what it would read now.
    ``strict``: an input the record has no hash of, or one it has that the stage no longer
    reads, counts as changed (the pipeline reruns the stage); otherwise only recorded inputs
    are judged (the report, on records of older versions). ``upstream_only``: only the
    inputs earlier stages made."""
    rec = manifest.stage(run, stage.name) or {}
    recorded = rec.get("input_hashes") or {}
    found = stage.inputs(run, settings or Settings())
    keys = list(found) + [k for k in recorded if k not in found]
    if upstream_only:
        keys = [k for k in keys if k in stage.upstream]
    if not strict:
        keys = [k for k in keys if k in recorded]
    return [k for k in keys if k not in recorded or k not in found or digest(found[k]) != recorded[k]]


def status_problem(rec: dict | None, stage: "Stage") -> str | None:
    name = stage.name
    if rec is None:
        return f"no {name} stage yet"
    status = rec.get("status")
    if status in stage.settled:
        return None
    if status == "running":
        return f"the last {name} did not finish (killed or interrupted)"
    error = rec.get("error")
    return f"the last {name} ended {status}" + (f" ({str(error)[:200]})" if error else "")


def outputs_problem(run: Path, name: str) -> str | None:
    problems = manifest.verify_outputs(run, name)
    return f"its outputs changed ({problems[0]})" if problems else None


def why_run(run: Path, stage: "Stage", settings: Settings) -> str | None:
    """Why ``stage`` must run, or None when its record still describes the run: settled, the
    same input hashes as what it would read now, its outputs on disk as recorded."""
    rec = manifest.stage(run, stage.name)
    problem = status_problem(rec, stage)
    if problem:
        return problem
    changed = changed_inputs(run, stage, settings)
    if changed:
        return stage.reason(run, changed, rec, settings)
    return outputs_problem(run, stage.name)


# --------------------------------------------------------------------------- the declaration
class Stage:
    """One stage's declaration (see the module docstring). Subclasses live in the stage's module."""

    name = ""
    #: {input: the stage that made it}: the inputs that are earlier stages' artifacts.
    upstream: dict[str, str] = {}
    #: Record statuses that need no rerun for the same inputs.
    settled: tuple[str, ...] = ("complete",)
    #: How each input is named in messages (default: its key).
    labels: dict[str, str] = {}
    #: True when the stage notes its own failures (the pipeline leaves its record alone).
    notes_own_failures = False

    def inputs(self, run: Path, settings: Settings) -> dict:
        return {}

    def outputs(self, run: Path, settings: Settings) -> list[Path]:
        return []

    def run(self, run: Path, settings: Settings):
        raise NotImplementedError

    def summary(self, run: Path, result) -> str:
        return ""

    def skipped(self, run: Path, rec: dict) -> tuple[str, int] | None:
        """(what to say, exit code) for a settled record that is not plainly complete."""
        return None

    def label(self, key: str) -> str:
        return self.labels.get(key, key)

    def reason(self, run: Path, changed: list[str], rec: dict, settings: Settings) -> str:
        """Why the stage must run again, given the inputs that changed (in declared order)."""
        key = changed[0]
        if key not in (rec.get("input_hashes") or {}):
            return f"its record has no hash of the {self.label(key)} (made by an older workbench)"
        if key not in self.inputs(run, settings):
            return f"it read the {self.label(key)}, which this run does not ask for"
        return f"the {self.label(key)} changed since the last {self.name}"

    def drift(self, run: Path, rec: dict, hash_tree=manifest.hash_tree) -> list[str]:
        """Recorded path inputs, inside the run or not, that are missing now or whose hash
        changed since the stage read them (qualify's hash gate). Inputs without a path (the
        config's text, the training rows, the GGUF types) are the stage's own business."""
        out = []
        paths = rec.get("inputs") or {}
        redo = "restore it, or bring it again" if rec.get("user_provided") else \
            f"rerun `workbench {self.name} --run DIR`"
        for key, want in (rec.get("input_hashes") or {}).items():
            recorded = paths.get(key)
            if not isinstance(recorded, str) or not recorded:
                continue
            path = manifest.resolve(run, recorded)
            if not path.exists():
                out.append(f"its input {recorded} is missing ({redo})")
            elif hash_tree(path) != want:
                out.append(f"its input {recorded} changed since the {self.name} stage read it ({redo})")
        return out
