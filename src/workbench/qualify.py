"""`workbench qualify`: the release gate before an adapter ships.

Eight gates, each measured, compared with a threshold and given PASS, FAIL or N/A
(with the reason); the defaults, and what each gate checks, are documented in
``src/workbench/configs/gates.yaml`` (a ``--gates`` file of the same shape overrides them):

    parity       the parity tests of the kernels the run trained with, on this device
    merge        merged model == adapter on its base (logits on the held-out rows, recomputed)
    gguf         each GGUF within its KL / top-1 / perplexity limits (export report; recomputed when small,
                 on the export stage's own held-out windows)
    adapter_gguf the GGUF LoRA adapter, applied by llama.cpp to the base GGUFs, within its limits against the
                 HF adapter (export report; recomputed when small); fails when it is missing
    eval         lm-eval changes against the adapter within tolerance (the eval stage's results, of every
                 shipped task, with the chat template; a missing or non-finite metric fails)
    tokenizer    HF tokenizer and each GGUF's llama.cpp vocabulary: identical ids, exact detokenization
    hashes       every stage's recorded outputs (and inputs, also those outside the run) still have their sha256
    performance  tokens/s and peak memory of the train stage against --baseline (N/A without one)

A gate never stops the others: a missing stage fails its gate with the command
that produces it, and an unexpected error fails only the gate it happened in.
The verdict is written atomically to ``RUN/qualify/verdict.{json,md}`` (with the
artifact hashes and the environment) and recorded as the "qualify" stage of the
manifest; no earlier stage's record or file is touched.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from workbench import atomic, manifest, stages
from workbench.errors import UserError
from workbench.markdown import num, table as markdown_table
from workbench.qualify_adapter import export_windows, gate_adapter_gguf, merged_logits_on_export_windows, \
    windows_label

PASS, FAIL, NA = "PASS", "FAIL", "N/A"
GATES_FILE = Path(str(resources.files("workbench") / "configs" / "gates.yaml"))   # package data
OUT_DIR = "qualify"
TITLES = {
    "parity": "kernel parity on this device",
    "merge": "merged model matches the adapter",
    "gguf": "GGUF files within their limits",
    "adapter_gguf": "GGUF LoRA adapter applied by llama.cpp within its limits",
    "eval": "lm-eval changes within tolerance",
    "tokenizer": "tokenizer round trip is exact",
    "hashes": "artifact hashes match the manifest",
    "performance": "performance against the baseline",
}
HINTS = {
    "train": "run `workbench train --run DIR` first.",
    "merge": "run `workbench merge --run DIR` first.",
    "export": "run `workbench export --run DIR` first.",
    "eval": "run `workbench eval --run DIR` first.",
}

#: A run made by `workbench export --merged FOLDER`: no train stage, a user-provided merge.
BROUGHT_MERGED = ("a brought merged model has no adapter to check it against; bring the adapter with "
                  "`workbench merge --run DIR --adapter FOLDER --base FOLDER` instead")
NO_TRAINING = "no training in this run: the merged model was brought"


def log(msg: str) -> None:
    print(f"[qualify] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- gates config
def _overlay(defaults: dict, data, where: str, path: Path) -> dict:
    """``defaults`` with ``data``'s values on top; keys must exist in ``defaults``
    and values must have the default's kind (number, bool, mapping)."""
    if not isinstance(data, dict):
        raise UserError(f"gates file {path}: {where or 'the file'} must be a mapping; see {GATES_FILE} for the shape.")
    out = dict(defaults)
    for key, value in data.items():
        here = f"{where}.{key}" if where else str(key)
        if key not in defaults:
            known = ", ".join(map(str, defaults)) or "(none)"
            raise UserError(f"gates file {path}: unknown key {here!r}; the keys there are {known}.")
        default = defaults[key]
        if isinstance(default, dict):
            out[key] = _overlay(default, value, here, path)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise UserError(f"gates file {path}: {here} must be true or false, got {value!r}.")
            out[key] = value
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise UserError(f"gates file {path}: {here} must be a finite number >= 0, got {value!r}.")
            if key in _FRACTIONS and value > 1:
                raise UserError(f"gates file {path}: {here} is a fraction of positions, between 0 and 1, got "
                                f"{value!r}.")
            out[key] = value
        else:   # a null default (parity.profile, parity.examples): checked by load_gates
            out[key] = value
    return out


#: Gate keys that are fractions (a limit above 1 could never be met).
_FRACTIONS = ("top1_agreement",)


def load_gates(path: str | os.PathLike | None = None) -> dict:
    """The shipped gates (``src/workbench/configs/gates.yaml``), with ``path``'s values on top."""
    import yaml

    from workbench.config import read_yaml_file

    defaults = yaml.safe_load(GATES_FILE.read_text())
    if path is None:
        return defaults
    path = Path(path)
    data = read_yaml_file(path, "gates file", f"pass a readable YAML mapping shaped like {GATES_FILE}.")
    gates = _overlay(defaults, data or {}, "", path)
    profile, examples = gates["parity"]["profile"], gates["parity"]["examples"]
    if profile not in (None, "ci", "gpu", "nightly"):
        raise UserError(f"gates file {path}: parity.profile must be ci, gpu, nightly or null, got {profile!r}.")
    if examples is not None and (isinstance(examples, bool) or not isinstance(examples, int) or examples < 1):
        raise UserError(f"gates file {path}: parity.examples must be a whole number >= 1 or null, got {examples!r}.")
    return gates


PARITY_REPORT_SHAPE = "pass the .json file that `workbench parity --report DIR` wrote on this device"
BASELINE_SHAPE = "pass a run's manifest.json or a qualify verdict.json"
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def _read_json_object(path: Path, flag: str, hint: str) -> dict:
    """The JSON object in ``path``; a UserError (one sentence, naming ``flag``) when the
    file cannot be read, is not JSON, or holds something other than an object."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{flag} {path} is not a readable JSON file ({err}); {hint}.") from None
    if not isinstance(doc, dict):
        raise UserError(f"{flag} {path} holds {_JSON_KINDS.get(type(doc), 'something')} where a JSON object is "
                        f"expected; {hint}.")
    return doc


# --------------------------------------------------------------------------- results
class GateResult(dict):
    """One gate's outcome: name, title, status, measured, threshold, message, checks."""

    def __init__(self, name: str, status: str, measured: str = "", threshold: str = "", message: str = "",
                 checks: list | None = None):
        super().__init__(name=name, title=TITLES[name], status=status, measured=measured, threshold=threshold,
                         message=message, checks=checks or [])


def item_check(item: str, status: str, measured=None, threshold=None, problems=(), short: str | None = None) -> dict:
    """One measured item of a gate; ``short``: the measured value in a few words (default: from ``measured``)."""
    return {"item": item, "status": status, "measured": measured, "threshold": threshold, "problems": list(problems),
            "short": _short(measured) if short is None else short}


_SHORT_NAMES = {"kl_mean": "KL", "top1_agreement": "top-1", "ppl_rel_delta": "ppl Δ",
                "max_abs_logit_diff": "max |Δlogit|"}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if 1 <= abs(value) < 1e6 else f"{value:.3g}"
    return str(value)


def limits_text(limits: dict) -> str:
    return ", ".join(f"{_SHORT_NAMES.get(k, k)} {'>=' if k == 'top1_agreement' else '<='} {_fmt(v)}"
                     for k, v in limits.items())


def _full(measured) -> str:
    if isinstance(measured, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in measured.items())
    return "" if measured is None else _fmt(measured)


def combine(name: str, checks: list[dict], threshold: str = "", ok_message: str = "") -> GateResult:
    status = FAIL if any(c["status"] == FAIL for c in checks) else PASS
    problems = [f"{c['item']}: {p}" for c in checks for p in c["problems"]]
    measured = "; ".join(f"{c['item']}: {c['short']}" for c in checks if c["short"])
    return GateResult(name, status, measured, threshold, "; ".join(problems) if problems else ok_message, checks)


def _short(measured) -> str:
    """Logit metrics as "KL 2.6e-07, top-1 1, ppl Δ 1.5e-05" (recomputed values over
    recorded ones when both are there); other dicts as "key value, ..."."""
    if measured is None:
        return ""
    if not isinstance(measured, dict):
        return _fmt(measured)
    recomputed = any(k.startswith("now ") for k in measured)
    parts = []
    for key, value in measured.items():
        if recomputed and key.startswith("export "):
            continue
        name = key.removeprefix("now ").removeprefix("export ")
        parts.append(f"{_SHORT_NAMES.get(name, name)} {_fmt(value)}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- shared state
class Context:
    """What the gates share, computed once when first needed: the held-out windows,
    the merged model's logits on them, hashes."""

    def __init__(self, run: Path, gates: dict, parity_report: Path | None, baseline: Path | None):
        import torch

        self.run, self.gates = run, gates
        self.parity_report, self.baseline = parity_report, baseline
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cache: dict = {}

    def stage(self, name: str) -> dict:
        return manifest.require_stage(self.run, name, HINTS[name])

    def brought_merged(self) -> bool:
        """The run holds a merged model the user brought (`workbench export --merged`)
        and no train stage: nothing was trained here, and there is no adapter."""
        merge = manifest.stage(self.run, "merge") or {}
        return bool(merge.get("user_provided")) and manifest.stage(self.run, "train") is None

    def tokenizer(self):
        """The run's HF tokenizer (RUN/tokenizer, which the train stage wrote)."""
        if "tokenizer" not in self.cache:
            from workbench.eval.models import load_tokenizer

            self.cache["tokenizer"] = load_tokenizer(self.run)
        return self.cache["tokenizer"]

    def heldout_rows(self) -> list[dict]:
        """The run's held-out rows (workbench.export.verify.heldout_rows)."""
        if "rows" not in self.cache:
            from workbench.export.verify import heldout_rows

            self.cache["rows"] = heldout_rows(self.run)[0]
        return self.cache["rows"]

    def heldout_texts(self) -> list[str]:
        """The run's held-out rows as the model sees them (chat template applied; verify.heldout_texts)."""
        if "texts" not in self.cache:
            from workbench.export.verify import heldout_texts

            self.cache["texts"] = heldout_texts(self.tokenizer(), self.heldout_rows())
        return self.cache["texts"]

    def merged_dir(self) -> Path:
        rec = self.stage("merge")
        merged = self.run / rec.get("merged_dir", "merge/merged")
        if not (merged / "config.json").is_file():
            raise UserError(f"{merged} has no config.json; run `workbench merge --run DIR` again.")
        return merged

    def windows(self) -> list[list[int]]:
        """The held-out ids the merge and export stages compared logits on (verify.heldout_windows)."""
        if "windows" not in self.cache:
            from workbench.export.verify import heldout_windows

            config = json.loads((self.merged_dir() / "config.json").read_text())
            self.cache["windows"] = heldout_windows(self.tokenizer(), config["max_position_embeddings"],
                                                    self.heldout_rows())[0]
        return self.cache["windows"]

    def merged_logits(self):
        if "merged_logits" not in self.cache:
            from workbench.export.compare import hf_logits
            from workbench.models import load_base

            model = load_base(self.merged_dir(), self.device)
            self.cache["merged_logits"] = hf_logits(model, self.windows())
        return self.cache["merged_logits"]

    def hash_tree(self, path: Path) -> str:
        key = ("hash", str(Path(path).resolve()))
        if key not in self.cache:
            self.cache[key] = manifest.hash_tree(path)
        return self.cache[key]


# --------------------------------------------------------------------------- 1. parity
def kernels_used(train: dict) -> list[str]:
    """The kernels the train stage patched in (its record's "kernels" report)."""
    report = train.get("kernels") or {}
    return sorted(k for k, per_type in (report.get("swapped") or {}).items() if per_type)


def gate_parity(ctx: Context) -> GateResult:
    if ctx.brought_merged():
        return GateResult("parity", NA, "no kernels", "0 failures", f"not applicable: {NO_TRAINING}")
    train = ctx.stage("train")
    kernels = kernels_used(train)
    if not kernels:
        why = "the adapter was brought in (`workbench merge --adapter`), not trained here" \
            if train.get("user_provided") else "the run used no Triton kernels"
        return GateResult("parity", NA, "no kernels", "0 failures", f"not applicable: {why}")
    from workbench.envinfo import device_name

    threshold = "0 failures on " + device_name()
    if ctx.parity_report is not None:
        return _parity_from_report(ctx.parity_report, kernels, threshold, ctx.gates)
    return _parity_run(ctx, kernels, threshold)


def _parity_from_report(path: Path, kernels: list[str], threshold: str, gates: dict) -> GateResult:
    """A `workbench parity --report` JSON stands in for running the tests when it was
    made on this device and, for each kernel the run used, tested every dtype the
    kernel registers (its per-test rows, "properties"), each test passed, its
    "failed" count is recorded and 0, and each test ran at least the gates'
    parity.examples (when the gates set one)."""
    from workbench.envinfo import device_name
    from workbench.kernels import registry

    doc = _read_json_object(path, "--parity-report", PARITY_REPORT_SHAPE)
    if not isinstance(doc.get("kernels"), dict):
        raise UserError(f"--parity-report {path} has no \"kernels\" mapping; {PARITY_REPORT_SHAPE}.")
    device = (doc.get("environment") or {}).get("device")
    per_kernel = doc["kernels"]
    rows = [r for r in doc.get("properties") or [] if isinstance(r, dict)]
    specs = registry()
    want_examples = gates["parity"]["examples"]
    rerun = "run `workbench parity --report DIR` here"
    checks = []
    for k in kernels:
        agg = per_kernel.get(k)
        problems = []
        if device != device_name():
            problems.append(f"the report was made on {device!r}, not on this device ({device_name()!r}); {rerun}")
        if not isinstance(agg, dict):
            problems.append(f"the report does not cover {k}; run `workbench parity --kernel {k} --report DIR`")
        else:
            mine = [r for r in rows if r.get("kernel") == k]
            dtypes = [str(d).removeprefix("torch.") for d in specs[k].dtypes] if k in specs else []
            if k not in specs:
                problems.append(f"this install does not register the kernel {k}; qualify with the workbench version "
                                "that trained the run")
            untested = [d for d in dtypes if d not in {r.get("dtype") for r in mine}]
            if untested:
                problems.append(f"the report does not test {k} in {', '.join(untested)} (every dtype of the kernel: "
                                f"{', '.join(dtypes)}); run `workbench parity --kernel {k} --report DIR`")
            failed = agg.get("failed")
            if isinstance(failed, bool) or not isinstance(failed, int):
                problems.append(f"the report records no failure count for {k} (\"failed\": {failed!r}); {rerun}")
            elif failed:
                problems.append(f"{failed} of {agg.get('tests')} tests failed")
            bad = sorted({str(r.get("dtype")) for r in mine if r.get("ok") is not True})
            if bad and not (isinstance(failed, int) and failed):
                problems.append(f"the report's {k} test(s) in {', '.join(bad)} did not pass")
            if want_examples:
                few = sorted({f"{r.get('dtype')} ({r.get('examples')})" for r in mine
                              if not (isinstance(r.get("examples"), int) and r["examples"] >= want_examples)})
                if few:
                    problems.append(f"fewer hypothesis examples than the gates' parity.examples ({want_examples}) in "
                                    f"{', '.join(few)}; run `workbench parity --kernel {k} --report DIR` with "
                                    f"PARITY_EXAMPLES={want_examples}")
        measured = {"tests": agg.get("tests"), "examples": agg.get("examples"), "failed": agg.get("failed")} \
            if isinstance(agg, dict) else "not covered"
        checks.append(item_check(k, FAIL if problems else PASS, measured, "0 failures", problems))
    cases, problems = _parity_provenance(path, doc, rerun)
    for check in checks:
        k = check["item"]
        mine = _kernel_source_problems(doc, k, rerun)
        if cases is not None and k in specs:
            for d in [str(x).removeprefix("torch.") for x in specs[k].dtypes]:
                outcome = cases.get(f"test_parity[{k}-{d}]")
                if outcome != "passed":
                    mine.append(f"its junit XML has no passed test_parity[{k}-{d}] ("
                                f"{outcome or 'not run'}); {rerun}")
        if mine:
            check["problems"] += mine
            check["status"] = FAIL
    if problems:
        checks.append(item_check("report", FAIL, {"exit_code": doc.get("exit_code"), "counts": doc.get("counts")},
                             "exit code 0, 0 failed, junit XML and versions of this environment", problems,
                             f"exit code {doc.get('exit_code')}"))
    result = combine("parity", checks, threshold, f"from {path} ({doc.get('command', '')})")
    return result


def _kernel_source_problems(doc: dict, kernel: str, rerun: str) -> list[str]:
    """The report's record of ``kernel``'s source (and the shared kernel code) against this checkout's."""
    from workbench.parity_report import kernel_sources

    here = kernel_sources()
    recorded = doc.get("kernel_sources") if isinstance(doc.get("kernel_sources"), dict) else {}
    out = []
    for key, what in ((kernel, f"the source of {kernel}"), ("_support", "the shared kernel code (kernels/_*.py)")):
        mine = recorded.get(key) if isinstance(recorded.get(key), dict) else {}
        if key not in here:
            continue
        if not mine.get("sha256"):
            out.append(f"the report records no sha256 of {what}; {rerun}")
        elif mine["sha256"] != here[key]["sha256"]:
            out.append(f"the report tested other kernel sources: {what} ({here[key]['file']}) differs from this "
                       f"checkout's; {rerun}")
    return out


def _parity_provenance(path: Path, doc: dict, rerun: str) -> tuple[dict | None, list[str]]:
    """Whether the report is what `workbench parity --report` writes, for this environment:
    exit code 0; counts with tests passed and none failed; the junit XML next to it, with
    the recorded sha256 and the same counts; the torch/triton/workbench versions of this
    environment. Returns the junit XML's {test name: outcome} (None when unreadable) and
    the problems."""
    from workbench.envinfo import environment
    from workbench.parity_report import VERSION_KEYS, junit_counts, sha256

    problems = []
    code = doc.get("exit_code")
    if isinstance(code, bool) or code != 0:
        problems.append(f"the parity run's pytest exit code is {code!r}, not 0 ({doc.get('pytest_summary', '')})")
    counts = doc.get("counts")
    if not isinstance(counts, dict) or not all(isinstance(counts.get(k), int) and not isinstance(counts.get(k), bool)
                                               for k in ("tests", "passed", "failed", "errors", "skipped")):
        problems.append(f"the report records no pytest counts (tests, passed, failed, errors, skipped); {rerun}")
        counts = None
    elif counts["failed"] or counts["errors"] or not counts["passed"]:
        problems.append(f"pytest counted {counts['passed']} passed, {counts['failed']} failed and {counts['errors']} "
                        "errors")
    cases = None
    junit = doc.get("junit") if isinstance(doc.get("junit"), dict) else {}
    name = junit.get("file")
    xml = path.parent / name if isinstance(name, str) and name and "/" not in name and "\\" not in name else None
    if xml is None or not junit.get("sha256"):
        problems.append(f"the report names no junit XML with its sha256; {rerun}")
    elif not xml.is_file():
        problems.append(f"its junit XML {name} is not next to it; keep the report's files together, or {rerun}")
    elif sha256(xml) != junit["sha256"]:
        problems.append(f"its junit XML {name} is not the one the report was written with (sha256 differs); {rerun}")
    else:
        try:
            found = junit_counts(xml)
        except ValueError as err:
            problems.append(f"its junit XML {name} is {err}; {rerun}")
        else:
            cases = found.pop("cases")
            if counts is not None and found != {k: counts[k] for k in found}:
                problems.append(f"its counts ({counts}) are not those of its junit XML ({found})")
    env = environment()
    recorded = doc.get("versions") if isinstance(doc.get("versions"), dict) else {}
    other = [f"{k} {recorded.get(k)!r} (here {env.get(k)!r})" for k in VERSION_KEYS if recorded.get(k) != env.get(k)]
    if other:
        problems.append(f"the report was made with other versions: {', '.join(other)}; {rerun}")
    return cases, problems


def _parity_run(ctx: Context, kernels: list[str], threshold: str) -> GateResult:
    """Run the parity tests of exactly these kernels (every dtype) here, and write
    the usual parity report into RUN/qualify/parity/."""
    import torch

    from workbench import parity_report
    from workbench.cli.common import REPO_ROOT
    from workbench.kernels import registry

    tests = REPO_ROOT / "parity" / "test_parity.py"
    if not tests.is_file():
        raise UserError(f"the parity suite is not at {tests.parent} (an install without the source checkout); "
                        "run qualify from a source checkout or pass --parity-report JSON from `workbench parity "
                        "--report DIR` made on this device.")
    specs = registry()
    unknown = [k for k in kernels if k not in specs]
    if unknown:
        raise UserError(f"the run used kernel(s) {', '.join(unknown)} that this install does not register; "
                        "qualify with the workbench version that trained the run.")
    # The suite's test ids: test_parity[<kernel>-<dtype without "torch.">] (parity/test_parity.py).
    ids = [f"{tests}::test_parity[{k}-{str(d).removeprefix('torch.')}]" for k in kernels for d in specs[k].dtypes]
    env = dict(os.environ)
    profile = ctx.gates["parity"]["profile"] or ("gpu" if torch.cuda.is_available() else "ci")
    env["PARITY_PROFILE"] = profile
    if ctx.gates["parity"]["examples"]:
        env["PARITY_EXAMPLES"] = str(ctx.gates["parity"]["examples"])
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    junit_dir = tempfile.mkdtemp()
    junit = Path(junit_dir) / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *ids]
    log(f"running the parity tests of {', '.join(kernels)} ({len(ids)} tests, profile {profile})")
    out_dir = ctx.run / OUT_DIR / "parity"
    shutil.rmtree(out_dir, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        env["PARITY_STATS"] = str(Path(tmp) / "stats.jsonl")
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        lines = [ln.strip().strip("= ") for ln in proc.stdout.splitlines() if ln.strip()]
        stats = parity_report.load_stats(Path(env["PARITY_STATS"]))
        md, js = parity_report.write(out_dir, stats, " ".join(cmd), time.perf_counter() - start, proc.returncode,
                                     lines[-1] if lines else "", junit=junit)
    shutil.rmtree(junit_dir, ignore_errors=True)
    ctx.cache["parity_files"] = [md, js]
    checks = []
    for k in kernels:
        rows = [r for r in stats if r["kernel"] == k]
        failed = sum(not r["ok"] for r in rows)
        problems = []
        if len(rows) < len(specs[k].dtypes):
            problems.append(f"only {len(rows)} of {len(specs[k].dtypes)} dtype tests reported (see {md})")
        if failed:
            problems.append(f"{failed} of {len(rows)} tests failed; the failing case's rerun command is in the "
                            f"pytest output (`{' '.join(cmd)}`)")
        checks.append(item_check(k, FAIL if problems else PASS,
                             {"tests": len(rows), "examples": sum(r["examples"] for r in rows), "failed": failed},
                             "0 failures", problems))
    if proc.returncode != 0 and all(c["status"] == PASS for c in checks):
        tail = " | ".join(lines[-3:])
        checks.append(item_check("pytest", FAIL, {"exit_code": proc.returncode}, "exit code 0", [tail[:500]]))
    return combine("parity", checks, threshold, f"profile {profile}; report {md.relative_to(ctx.run)}")


# --------------------------------------------------------------------------- 2. merge
def gate_merge(ctx: Context) -> GateResult:
    from workbench.eval.models import adapter_model
    from workbench.export.compare import hf_logits, logit_metrics
    from workbench.export.merge import base_model_path, require_adapter
    from workbench.export.verify import failures
    from workbench.models import load_base, with_adapter

    if ctx.brought_merged():
        raise UserError(BROUGHT_MERGED + ".")
    train, rec = ctx.stage("train"), ctx.stage("merge")
    limits = ctx.gates["merge"].get(rec.get("dtype") or "float32")
    if limits is None:
        raise UserError(f"the gates have no merge limits for dtype {rec.get('dtype')!r}; add merge.{rec.get('dtype')} "
                        "to the gates file.")
    base, adapter = base_model_path(ctx.run, train), require_adapter(ctx.run)
    wins = ctx.windows()
    pairs = [("merge/merged", ctx.merged_dir(), lambda: with_adapter(load_base(base, ctx.device), adapter),
              "adapter on the base (fp32)")]
    nf4 = ctx.run / "merge" / "merged_from_nf4"
    if train.get("quantization") and (nf4 / "config.json").is_file():
        pairs.append(("merge/merged_from_nf4", nf4, lambda: adapter_model(ctx.run, base, train),
                      "adapter on the NF4 base"))
    checks = []
    for item, folder, reference, what in pairs:
        log(f"merge: {item} vs the {what}")
        ref = hf_logits(reference(), wins)
        test = ctx.merged_logits() if folder == ctx.merged_dir() else hf_logits(load_base(folder, ctx.device), wins)
        m = logit_metrics(ref, test, wins)
        measured = {k: m[k] for k in ("kl_mean", "top1_agreement", "ppl_rel_delta", "max_abs_logit_diff")}
        problems = failures(m, limits)
        if problems:
            problems.append("not the merge of this adapter into this base (a swapped or changed adapter or merged "
                            "model); rerun `workbench merge --run DIR`")
        checks.append(item_check(item, FAIL if problems else PASS, measured, limits, problems))
    return combine("merge", checks, f"{rec.get('dtype')}: {limits_text(limits)}",
                    f"on {sum(len(w) for w in wins)} tokens of the run's held-out rows through the chat template, "
                    "as training renders them (the ids the merge stage compared)")


# --------------------------------------------------------------------------- 3. gguf
def _gguf_files(ctx: Context) -> dict:
    rec = manifest.stage(ctx.run, "export")
    if not rec:
        raise UserError(f"{ctx.run} has no export stage; {HINTS['export']}")
    files = rec.get("files") or {}
    if not files:
        raise UserError(f"the export stage of {ctx.run} recorded no GGUF file; run `workbench export --run DIR`.")
    return files


def gate_gguf(ctx: Context) -> GateResult:
    from workbench.export.compare import logit_metrics
    from workbench.export.verify import LlamaCpp, failures

    files = _gguf_files(ctx)
    gates = ctx.gates["gguf"]
    checks = []
    for kind, entry in files.items():
        path = ctx.run / entry["path"]
        limits = gates["thresholds"].get(kind)
        if limits is None:
            checks.append(item_check(entry["path"], FAIL, None, None,
                                 [f"the gates have no thresholds for {kind}; add gguf.thresholds.{kind}"]))
            continue
        recorded = entry.get("llama_cpp") or {}
        problems = [f"export stage (llama.cpp): {p}" for p in failures(recorded, limits)] if recorded else \
            ["the export record has no llama.cpp verification numbers; rerun `workbench export --run DIR`"]
        tf = entry.get("transformers") or {}
        if tf.get("supported"):
            problems += [f"export stage (transformers): {p}" for p in failures(tf, limits)]
        measured = {f"export {k}": recorded[k] for k in limits if k in recorded}
        if not path.is_file():
            problems.append(f"{entry['path']} is missing; run `workbench export --run DIR`")
            checks.append(item_check(entry["path"], FAIL, measured, limits, problems))
            continue
        same = manifest.sha256_file(path) == entry.get("sha256")
        if path.stat().st_size <= gates["recompute_max_mib"] * 2**20:
            log(f"gguf: recomputing {entry['path']} in llama.cpp against the merged model")
            wins = export_windows(ctx)   # the export stage's tokens: "now" measures what "export" measured
            try:
                llm = LlamaCpp(path, n_ctx=max(len(w) for w in wins))
            except (ValueError, RuntimeError, OSError) as err:
                problems.append(f"llama.cpp cannot open it ({str(err).splitlines()[0][:200]})")
            else:
                try:
                    now = logit_metrics(merged_logits_on_export_windows(ctx), llm.logits(wins), wins)
                finally:
                    llm.close()
                measured.update({f"now {k}": now[k] for k in limits})
                problems += [f"recomputed: {p}" for p in failures(now, limits)]
        elif not same:
            problems.append("the file changed since the export stage measured it (sha256 differs) and is larger than "
                            f"recompute_max_mib ({gates['recompute_max_mib']}); rerun `workbench export --run DIR`")
        if not same:
            measured["note"] = "sha256 differs from the export record"
        checks.append(item_check(entry["path"], FAIL if problems else PASS, measured, limits, problems))
    thresholds_text = "; ".join(f"{k}: {limits_text(gates['thresholds'][k])}" for k in files if k in gates["thresholds"])
    notes = [entry["fallback_note"] for entry in files.values() if entry.get("fallback_note")]
    where = windows_label(ctx) if any("now kl_mean" in (c["measured"] or {}) for c in checks) else ""
    result = combine("gguf", checks, thresholds_text, "; ".join([f"note: {n}" for n in notes] + [where] * bool(where)))
    if notes and result["status"] == FAIL:
        result["message"] += "; " + "; ".join(f"note: {n}" for n in notes)
    return result


# --------------------------------------------------------------------------- 4. eval
def gate_eval(ctx: Context) -> GateResult:
    from workbench.eval import compare, models

    rec = ctx.stage("eval")
    tolerances = ctx.gates["eval"]["tolerances"]
    metrics = rec.get("metrics") or {}
    evaluated = rec.get("models") or list(metrics)
    shipped = ["merged"] + list((manifest.stage(ctx.run, "export") or {}).get("files", {}))
    artifacts = models.locate(ctx.run)
    problems_all = []
    if compare.REFERENCE not in metrics:
        problems_all.append(BROUGHT_MERGED if ctx.brought_merged() else
                            "the eval stage did not evaluate the adapter, the reference of every change; "
                            "run `workbench eval --run DIR` with it")
    if rec.get("limit") and not ctx.gates["eval"]["allow_limit"]:
        problems_all.append(f"the eval ran with --limit {rec['limit']} (tolerances assume the whole held-out split); "
                            "rerun `workbench eval --run DIR` without --limit")
    problems_all += _eval_options_problems(ctx.run, rec)
    for kind in evaluated:   # the numbers must be of these very files
        want, art = (rec.get("input_hashes") or {}).get(kind), artifacts.get(kind)
        if want and (art is None or art.path is None or ctx.hash_tree(art.path) != want):
            problems_all.append(f"the {kind} model changed since `workbench eval` measured it; rerun "
                                "`workbench eval --run DIR`")
    checks = [item_check("eval stage", FAIL, None, None, problems_all)] if problems_all else []
    frame, flags = compare.table({k: metrics[k] for k in [compare.REFERENCE, *shipped] if k in metrics}, tolerances)
    for kind in shipped:
        limits = tolerances.get(kind)
        if kind not in metrics:
            checks.append(item_check(kind, FAIL, None, limits, [f"not evaluated; run `workbench eval --run DIR` "
                                                            f"(or with --models including {kind})"]))
            continue
        row = frame[frame["model"] == kind].iloc[0]
        changes = {c: float(row[c]) for c in frame.columns if c.endswith((" Δ", " Δrel")) and compare.finite(row[c])}
        # Every metric the adapter has must be here, a finite number (a NaN is within no tolerance).
        problems = _metric_problems(metrics[kind], metrics.get(compare.REFERENCE) or {})
        problems += [f"{f['metric']} {f['change']:+.4g} beyond ±{f['tolerance']:g} vs the adapter"
                     for f in flags if f["model"] == kind and math.isfinite(f["change"])]
        scores = [abs(v) for k, v in changes.items() if k.endswith(" Δ")]
        ppls = [abs(v) for k, v in changes.items() if k.endswith(" Δrel")]
        short = ", ".join(([f"max |score Δ| {_fmt(max(scores))}"] if scores else []) +
                          ([f"max |ppl Δrel| {_fmt(max(ppls))}"] if ppls else []))
        checks.append(item_check(kind, FAIL if problems else PASS, changes, limits, problems, short))
    threshold = "; ".join(f"{k}: score ±{_fmt(tolerances[k].get('score'))}, "
                          f"perplexity ±{_fmt(tolerances[k].get('perplexity'))}" for k in shipped if k in tolerances)
    result = combine("eval", checks, threshold, f"tasks {', '.join(rec.get('tasks', []))}")
    if not checks:
        result["status"] = FAIL
    return result


def _metric_problems(mine: dict, reference: dict) -> list[str]:
    """A shipped model's metrics that cannot be compared with the adapter's: missing
    where the adapter has them, or not finite (NaN, inf) on either side."""
    from workbench.eval.compare import finite

    out = []
    for c, ref in sorted(reference.items()):
        value = mine.get(c)
        if value is None:
            out.append(f"{c} is missing (the adapter has it); rerun `workbench eval --run DIR`")
        elif not finite(value) or not finite(ref):
            out.append(f"{c} is {value} against the adapter's {ref}: not a finite number, so not within tolerance")
    return out


def _eval_options_problems(run: Path, rec: dict) -> list[str]:
    """The eval must have run what `workbench eval --run DIR` runs by default: every
    shipped task the held-out rows have documents for, no custom tasks, the chat template."""
    from workbench.eval.suite import default_tasks

    rerun = "rerun `workbench eval --run DIR`"
    out = []
    expected = default_tasks(run)
    ran = rec.get("tasks") or []
    missing = [t for t in expected if t not in ran]
    if missing:
        out.append(f"the eval ran tasks {', '.join(ran) or '(none recorded)'}, not {', '.join(missing)} (the "
                   f"tolerances are for every shipped task: {', '.join(expected)}); {rerun} without --tasks")
    if rec.get("include"):
        out.append(f"the eval ran with custom tasks (--include {', '.join(map(str, rec['include']))}), which the "
                   f"tolerances were not measured on; {rerun} without --include")
    if rec.get("chat_template") is False:
        out.append(f"the eval ran without the chat template the adapter was trained with; {rerun} without "
                   "--no-chat-template")
    return out


# --------------------------------------------------------------------------- 5. tokenizer
def gate_tokenizer(ctx: Context) -> GateResult:
    from workbench.export.verify import LlamaCpp, tokenizer_corpus, tokenizer_roundtrip

    class Vocab(LlamaCpp):
        """A GGUF's tokenizer only (llama.cpp with vocab_only): no weights are loaded."""

        def __init__(self, path: Path):   # no super().__init__(): it would load the weights
            import llama_cpp

            self.llm = llama_cpp.Llama(str(path), vocab_only=True, n_ctx=16, verbose=False)

        def detokenize(self, ids: list[int]) -> str:
            return self.llm.detokenize(ids, special=True).decode("utf-8", errors="replace")

    files = _gguf_files(ctx)
    tok = ctx.tokenizer()
    texts = ctx.heldout_texts()
    corpus = tokenizer_corpus(tok, "\n".join(texts)) + texts
    limit = int(ctx.gates["tokenizer"]["max_mismatches"])
    ids = [tok.encode(t, add_special_tokens=False) for t in corpus]
    hf_back = [i for i, (t, x) in enumerate(zip(corpus, ids))
               if tok.decode(x, skip_special_tokens=False, clean_up_tokenization_spaces=False) != t]
    checks = []
    for kind, entry in files.items():
        path = ctx.run / entry["path"]
        if not path.is_file():
            checks.append(item_check(entry["path"], FAIL, None, limit, [f"{entry['path']} is missing; run "
                                                                    "`workbench export --run DIR`"]))
            continue
        try:
            vocab = Vocab(path)
        except (ValueError, RuntimeError, OSError) as err:
            checks.append(item_check(entry["path"], FAIL, None, limit,
                                 [f"llama.cpp cannot read its vocabulary ({str(err).splitlines()[0][:200]})"]))
            continue
        try:
            roundtrip = tokenizer_roundtrip(vocab, tok, corpus)
            back = [i for i, (t, x) in enumerate(zip(corpus, ids)) if vocab.detokenize(x) != t]
        finally:
            vocab.close()
        bad = roundtrip["mismatches"]
        measured = {"strings": len(corpus), "id_mismatches": len(bad), "llama_cpp_detokenize_mismatches": len(back),
                    "hf_decode_mismatches": len(hf_back)}
        problems = []
        if len(bad) > limit:
            first = bad[0]
            problems.append(f"{len(bad)} of {len(corpus)} strings tokenize differently in llama.cpp than with "
                            f"RUN/tokenizer (first: {first['text'][:40]!r}: HF {first['hf'][:8]} vs llama.cpp "
                            f"{first['llama_cpp'][:8]}); the GGUF carries another tokenizer than the run's")
        if len(back) > limit:
            problems.append(f"{len(back)} strings do not detokenize back to their text in llama.cpp "
                            f"(first: {corpus[back[0]][:40]!r})")
        if len(hf_back) > limit:
            problems.append(f"{len(hf_back)} strings do not decode back to their text with RUN/tokenizer "
                            f"(first: {corpus[hf_back[0]][:40]!r})")
        checks.append(item_check(entry["path"], FAIL if problems else PASS, measured, f"<= {limit} mismatches", problems,
                             f"{len(bad)}/{len(corpus)} id, {len(back) + len(hf_back)} text mismatches"))
    return combine("tokenizer", checks, f"<= {limit} mismatches (ids and text)",
                    f"{len(corpus)} strings: the held-out rows and the export stage's tokenizer corpus")


# --------------------------------------------------------------------------- 6. hashes
def artifact_table(run: Path, hash_tree=manifest.hash_tree) -> tuple[dict, list[str]]:
    """{stage: {rel: {sha256, bytes, state}}} for every stage's recorded outputs
    (state ok / missing / changed), and the problems: verify_outputs' messages, and what each
    stage says of its recorded inputs (:meth:`workbench.stages.Stage.drift`: those inside the run
    or not that are missing or whose hash changed; for the report, the records it rendered)."""
    records = manifest.read(run).get("stages", {})
    table, problems = {}, []
    for name, rec in records.items():
        if name not in stages.PIPELINE:
            continue
        found = manifest.verify_outputs(run, name)
        problems += [f"{name}: {p}" for p in found]
        rows = {}
        for rel, meta in (rec.get("outputs") or {}).items():
            state = "ok"
            for p in found:
                if p.startswith(f"{rel} "):
                    state = "missing" if p.endswith("is missing") else "changed"
            rows[rel] = {"sha256": meta.get("sha256"), "bytes": meta.get("bytes"), "state": state}
        table[name] = rows
        problems += [f"{name}: {p}" for p in stages.get(name).drift(run, rec, hash_tree)]
    return table, problems


def gate_hashes(ctx: Context) -> GateResult:
    table, problems = artifact_table(ctx.run, ctx.hash_tree)
    ctx.cache["artifacts"] = table
    if not table:
        raise UserError(f"{ctx.run} has no recorded stage; {HINTS['train']}")
    files = sum(len(rows) for rows in table.values())
    checks = [item_check(name, FAIL if any(p.startswith(f"{name}: ") for p in problems) else PASS,
                     {"files": len(rows), "bad": sum(r["state"] != "ok" for r in rows.values())}, "all match",
                     [p.split(": ", 1)[1] for p in problems if p.startswith(f"{name}: ")], "")
              for name, rows in table.items()]
    result = combine("hashes", checks, "every recorded sha256 matches")
    result["measured"] = f"{files} files in {len(table)} stages, {len(problems)} problem(s)"
    return result


# --------------------------------------------------------------------------- 7. performance
def train_performance(train: dict) -> dict:
    env = train.get("environment") if isinstance(train.get("environment"), dict) else {}
    return {"device": env.get("device"), "tokens_per_s": train.get("tokens_per_s"),
            "peak_memory_gib": train.get("peak_memory_gib"), "peak_rss_mib": train.get("peak_rss_mib")}


def _baseline_performance(doc: dict) -> dict | None:
    if isinstance(doc.get("stages"), dict) and isinstance(doc["stages"].get("train"), dict):  # a manifest.json
        return train_performance(doc["stages"]["train"])
    if isinstance(doc.get("train_performance"), dict):                           # a qualify verdict.json
        return doc["train_performance"]
    if "tokens_per_s" in doc:
        return doc
    return None


def _baseline_from(path: Path) -> dict:
    """The train performance a --baseline file holds (UserError when it holds none)."""
    base = _baseline_performance(_read_json_object(path, "--baseline", BASELINE_SHAPE))
    if base is None:
        raise UserError(f"--baseline {path} holds no train performance; {BASELINE_SHAPE}.")
    for key in ("tokens_per_s", "peak_memory_gib", "peak_rss_mib"):
        value = base.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise UserError(f"--baseline {path}: {key} is {value!r}, where a number (or null) belongs; "
                            f"{BASELINE_SHAPE} as workbench wrote it.")
    if base.get("device") is not None and not isinstance(base.get("device"), str):
        raise UserError(f"--baseline {path}: device is {base.get('device')!r}, where a name belongs; "
                        f"{BASELINE_SHAPE} as workbench wrote it.")
    return base


def gate_performance(ctx: Context) -> GateResult:
    if ctx.baseline is None:
        return GateResult("performance", NA, "", "", "not applicable: no --baseline REPORT.json given")
    if ctx.brought_merged():
        return GateResult("performance", NA, "", "", f"not applicable: {NO_TRAINING}")
    gates = ctx.gates["performance"]
    now = train_performance(ctx.stage("train"))
    base = _baseline_from(ctx.baseline)
    checks = []
    problems = []
    if gates["same_device"] and base.get("device") != now["device"]:
        problems.append(f"the baseline was trained on {base.get('device')!r}, this run on {now['device']!r}; "
                        "compare runs of one device (or set performance.same_device: false)")
    if not now["tokens_per_s"] or not base.get("tokens_per_s"):
        problems.append("tokens/s is missing from the train record or the baseline")
    else:
        ratio = now["tokens_per_s"] / base["tokens_per_s"]
        ok = ratio >= gates["min_tokens_per_s_ratio"]
        checks.append(item_check("tokens/s", PASS if ok else FAIL,
                             {"run": now["tokens_per_s"], "baseline": base["tokens_per_s"], "ratio": ratio},
                             f"ratio >= {gates['min_tokens_per_s_ratio']}",
                             [] if ok else [f"{ratio:.3f} x the baseline's tokens/s"]))
    key = "peak_memory_gib" if now.get("peak_memory_gib") and base.get("peak_memory_gib") else "peak_rss_mib"
    if now.get(key) and base.get(key):
        ratio = now[key] / base[key]
        ok = ratio <= gates["max_peak_memory_ratio"]
        checks.append(item_check(key, PASS if ok else FAIL, {"run": now[key], "baseline": base[key], "ratio": ratio},
                             f"ratio <= {gates['max_peak_memory_ratio']}",
                             [] if ok else [f"{ratio:.3f} x the baseline's {key}"]))
    else:
        problems.append("peak memory is missing from the train record or the baseline")
    if problems:
        checks.insert(0, item_check("baseline", FAIL, {"baseline": str(ctx.baseline)}, None, problems))
    return combine("performance", checks, f"tokens/s >= {gates['min_tokens_per_s_ratio']} x, peak memory <= "
                                           f"{gates['max_peak_memory_ratio']} x the baseline's",
                    f"baseline {ctx.baseline}")


GATES = [("parity", gate_parity), ("merge", gate_merge), ("gguf", gate_gguf), ("adapter_gguf", gate_adapter_gguf),
         ("eval", gate_eval),
         ("tokenizer", gate_tokenizer), ("hashes", gate_hashes), ("performance", gate_performance)]


# --------------------------------------------------------------------------- report
def markdown(verdict: dict) -> str:
    env = verdict["environment"]
    lines = [f"# Qualification — {verdict['run']} — {verdict['verdict']}", "",
             f"- **Verdict:** {verdict['verdict']} ({verdict['summary']})",
             f"- **Command:** `{verdict['command']}`",
             f"- **Gates:** {verdict['gates_file']}",
             f"- **Device:** {env['device']}; torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
             f"transformers {env['transformers']}, peft {env['peft']}, python {env['python']}; {env['time_utc']}",
             "", table(verdict["gates"]), ""]
    for g in verdict["gates"]:
        lines += [f"## {g['name']}: {g['status']} — {g['title']}", ""]
        if g["message"]:
            lines += [num(g["message"]), ""]
        if g["checks"]:
            rows = [[c["item"], c["status"], _full(c["measured"]),
                     limits_text(c["threshold"]) if isinstance(c["threshold"], dict) else
                     "" if c["threshold"] is None else str(c["threshold"]),
                     "; ".join(c["problems"])] for c in g["checks"]]
            lines += [*markdown_table(["item", "status", "measured", "threshold", "problems"], rows, align="lllll"), ""]
    rows = [[stage, rel, str(r["bytes"]), f"`{r['sha256']}`", r["state"]]
            for stage, files in verdict["artifacts"].items() for rel, r in files.items()]
    lines += ["## Artifact hashes", "", *markdown_table(["stage", "file", "bytes", "sha256", "state"], rows,
                                                        align="llrll")]
    lines += ["", "## Environment", "", "```json", json.dumps(env, indent=2), "```", ""]
    return "\n".join(lines)


def table(gates: list[dict]) -> str:
    """The gate table: gate, status, measured, threshold (Markdown), then what failed. No cell is cut
    short: the measured values are the verdict (markdown.num escapes "|")."""
    rows = [[g["name"], g["status"], str(g["measured"] if g["status"] != NA else g["message"]), str(g["threshold"])]
            for g in gates]
    failed = [f"- **{g['name']}** failed: {g['message']}" for g in gates if g["status"] == FAIL]
    failed += [f"- **{g['name']}** {g['message']}" for g in gates
               if g["status"] == PASS and str(g["message"]).startswith("note: ")]
    return "\n".join(markdown_table(["gate", "status", "measured", "threshold"], rows, align="llll")
                     + ([""] + failed if failed else []))


# --------------------------------------------------------------------------- the stage
def run_qualify(run: str | os.PathLike, gates: str | os.PathLike | None = None,
                parity_report: str | os.PathLike | None = None, baseline: str | os.PathLike | None = None,
                command: str | None = None) -> dict:
    """Every gate on ``run``; writes RUN/qualify/verdict.{json,md}, records the
    "qualify" stage, and returns the verdict (``verdict["passed"]``)."""
    from workbench.offline import enforce_offline

    enforce_offline()
    run = manifest.require_run(run)
    manifest.read(run)   # an unreadable manifest is the user's to fix (UserError), not seven failed gates
    config = load_gates(gates)
    extra = {}
    # Bad input is the user's to fix (exit 2), whether or not its gate applies to this run.
    if parity_report is not None:
        path = Path(parity_report)
        if not isinstance(_read_json_object(path, "--parity-report", PARITY_REPORT_SHAPE).get("kernels"), dict):
            raise UserError(f"--parity-report {path} has no \"kernels\" mapping; {PARITY_REPORT_SHAPE}.")
        extra["--parity-report"] = path.resolve()
    if baseline is not None:
        path = Path(baseline)
        _baseline_from(path)
        extra["--baseline"] = path.resolve()
    with manifest.lock(run):
        return _qualify(run, gates, config, extra, command)


def _qualify(run: Path, gates, config: dict, extra: dict, command: str | None) -> dict:
    from workbench.envinfo import environment

    ctx = Context(run, config, extra.get("--parity-report"), extra.get("--baseline"))
    import transformers

    transformers.logging.set_verbosity_error()

    results = []
    start = time.perf_counter()
    for i, (name, gate) in enumerate(GATES, 1):
        log(f"[{i}/{len(GATES)}] {name}: {TITLES[name]}")
        t0 = time.perf_counter()
        try:
            result = gate(ctx)
        except UserError as err:
            result = GateResult(name, FAIL, "", "", str(err))
        except Exception as err:   # one gate's crash must not stop the others
            result = GateResult(name, FAIL, "", "", f"error: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
                                if str(err) else f"error: {type(err).__name__}")
        result["seconds"] = round(time.perf_counter() - t0, 3)
        results.append(result)
        log(f"[{i}/{len(GATES)}] {name}: {result['status']}"
            + (f" — {result['message']}" if result["message"] else ""))
    if "artifacts" not in ctx.cache:
        ctx.cache["artifacts"] = artifact_table(run)[0]

    passed = all(r["status"] != FAIL for r in results)
    failed = [r["name"] for r in results if r["status"] == FAIL]
    train = manifest.stage(run, "train") or {}
    verdict = {
        "suite": "qualify",
        "run": str(run),
        "verdict": PASS if passed else FAIL,
        "passed": passed,
        "summary": "every gate passed" if passed else f"failed: {', '.join(failed)}",
        "command": command or f"workbench qualify --run {run}",
        "gates_file": str(Path(gates).resolve()) if gates else f"{GATES_FILE} (defaults)",
        "gates_config": config,
        "gates": results,
        "train_performance": train_performance(train) if train else None,
        "artifacts": ctx.cache["artifacts"],
        "environment": environment(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    out = run / OUT_DIR
    files = [atomic.write_json(out / "verdict.json", verdict), atomic.write_text(out / "verdict.md", markdown(verdict))]
    files += ctx.cache.get("parity_files", [])
    found = {k: Path(v).resolve() for k, v in (("gates", gates), ("parity_report", ctx.parity_report),
                                               ("baseline", ctx.baseline)) if v}
    stages.record(run, STAGE, None, {
        "status": "complete" if passed else "failed_qualification",
        "passed": passed,
        "gates": {r["name"]: r["status"] for r in results},
        "timings": {r["name"]: r["seconds"] for r in results} | {"total_s": verdict["seconds"]},
    }, found=found, outputs=files)
    log(f"verdict {verdict['verdict']} in {verdict['seconds']:.1f}s: {out / 'verdict.md'}")
    return verdict


class QualifyStage(stages.Stage):
    """Reads the run's records and artifacts, and the files given (gates, parity report,
    baseline); writes qualify/. Not a pipeline stage: `workbench qualify` runs it on its own."""

    name = "qualify"


STAGE = QualifyStage()
