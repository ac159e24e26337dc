"""The accuracy suite (bench/accuracy.py): the verdict rule on hand-made runs, the
per-run configs, the report, and one end-to-end CPU run of both stacks and two seeds."""
import json
import math
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from workbench.bench import accuracy as acc
from workbench.errors import UserError

MC = "wb_synthetic_mc acc"
PPL = "wb_heldout_ppl word_perplexity"


def row(stack, seed, metrics, docs=10000, exit_code=0, **extra):
    """A finished run row as run() writes it (documents per task from the metric names)."""
    r = {"stack": stack, "label": acc.STACKS[stack], "seed": seed, "exit_code": exit_code}
    if metrics is not None:
        r["metrics"] = metrics
        r["documents"] = {name.split(" ")[0]: docs for name in metrics}
    r.update(extra)
    return r


def four(metric, hf0, hf1, ours0, ours1, docs=10000):
    return [row("hf", 0, {metric: hf0}, docs), row("ours", 0, {metric: ours0}, docs),
            row("hf", 1, {metric: hf1}, docs), row("ours", 1, {metric: ours1}, docs)]


def only(comparisons, metric=MC):
    (c,) = [c for c in comparisons if c["metric"] == metric]
    return c


# --------------------------------------------------------------------------- compare()
def test_within_noise_when_every_seed_differs_less_than_the_seed_noise():
    runs = four(MC, 0.80, 0.70, 0.78, 0.74)
    c = only(acc.compare(runs))
    assert c["kind"] == "score"
    assert [p["diff"] for p in c["per_seed"]] == pytest.approx([-0.02, 0.04])
    assert c["noise"]["hf"] == pytest.approx(0.10) and c["noise"]["ours"] == pytest.approx(0.04)
    assert c["noise_used"] == pytest.approx(0.10)
    assert c["verdict"] == acc.WITHIN and "direction" not in c
    assert acc.passed(runs, [c])


def test_outside_noise_when_one_seed_differs_more_than_both_stacks_spread():
    # hf's seeds agree within 0.01, ours's within 0.01; ours is 0.2 below hf at both seeds.
    c = only(acc.compare(four(MC, 0.80, 0.79, 0.60, 0.61)))
    assert c["verdict"] == acc.OUTSIDE and c["direction"] == "ours worse"
    assert c["max_abs_diff"] == pytest.approx(0.2)
    # One seed outside is enough: seed 0 equal, seed 1 off by 0.15 while hf's seeds are 0.02 apart.
    # ours' own spread (0.17) is reported but does not excuse it.
    c = only(acc.compare(four(MC, 0.80, 0.78, 0.80, 0.63)))
    assert c["noise"]["ours"] == pytest.approx(0.17) and c["noise_used"] == pytest.approx(0.02)
    assert c["verdict"] == acc.OUTSIDE and c["direction"] == "ours worse"
    # Better than hf beyond the noise is not "within noise" either (something changed); it is labelled.
    c = only(acc.compare(four(MC, 0.50, 0.51, 0.90, 0.91)))
    assert (c["verdict"], c["direction"]) == (acc.OUTSIDE, "ours better")


def test_relative_metrics_compare_ratios_and_lower_is_better():
    c = only(acc.compare(four(PPL, 10.0, 10.5, 10.3, 10.4)), PPL)   # hf seeds 5 % apart, ours 3 % off
    assert c["kind"] == "relative" and c["lower_is_better"]
    assert c["per_seed"][0]["diff"] == pytest.approx(0.03) and c["noise"]["hf"] == pytest.approx(0.05)
    assert c["verdict"] == acc.WITHIN
    c = only(acc.compare(four(PPL, 10.0, 10.5, 11.2, 10.4)), PPL)    # 12 % worse at seed 0
    assert (c["verdict"], c["direction"]) == (acc.OUTSIDE, "ours worse")
    assert acc.metric_kind("wb_heldout_ppl bits_per_byte") == acc.metric_kind(acc.FINAL_LOSS) == "relative"
    assert acc.metric_kind("wb_synthetic_gen exact_match [strip]") == acc.metric_kind(acc.HELDOUT) == "score"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None, "0.8"])
def test_a_non_finite_or_missing_metric_never_counts_as_within_noise(bad):
    runs = four(MC, 0.80, 0.70, 0.78, 0.74)
    runs[1]["metrics"][MC] = bad                       # ours seed 0
    c = only(acc.compare(runs))
    assert c["verdict"] == acc.MISSING and c["missing"] == ["ours seed 0"]
    assert not acc.passed(runs, [c])


def test_a_metric_one_run_lacks_or_a_failed_run_is_missing():
    runs = four(MC, 0.80, 0.70, 0.78, 0.74)
    runs[2] = row("hf", 1, None, exit_code=1, error="train: boom")   # hf seed 1 failed: no metrics at all
    c = only(acc.compare(runs))
    assert c["verdict"] == acc.MISSING and c["missing"] == ["hf seed 1"]
    runs = four(MC, 0.80, 0.70, 0.78, 0.74)
    runs[3]["metrics"] = {"wb_synthetic_mc acc_norm": 0.7}             # ours seed 1 lacks MC
    assert only(acc.compare(runs))["verdict"] == acc.MISSING
    assert only(acc.compare(runs), "wb_synthetic_mc acc_norm")["verdict"] == acc.MISSING  # the others lack it
    # No ours at all (an hf-only run) is missing too, never a pass.
    assert {c["verdict"] for c in acc.compare([r for r in four(MC, .8, .7, .8, .7) if r["stack"] == "hf"])} \
        == {acc.MISSING}


def test_a_single_seed_leaves_the_noise_unmeasured_and_fails():
    runs = four(MC, 0.80, 0.70, 0.80, 0.70)[:2]      # seed 0 only, hf == ours
    c = only(acc.compare(runs))
    assert c["noise"] == {} and c["noise_used"] is None
    assert c["verdict"] == acc.UNMEASURED and not acc.passed(runs, [c])
    # hf's second seed failed but ours's measured a spread: seed 1 still has no pair, so that is missing.
    runs = four(MC, 0.80, 0.70, 0.79, 0.74)
    runs[2]["metrics"][MC] = float("nan")
    c = only(acc.compare(runs))
    assert set(c["noise"]) == {"ours"} and c["verdict"] == acc.MISSING
    # A spread that is not finite (a relative change from 0) is no measurement either.
    c = only(acc.compare(four(acc.FINAL_LOSS, 0.0, 0.5, 0.0, 0.5)), acc.FINAL_LOSS)
    assert c["noise"]["hf"] == math.inf and c["noise_used"] is None and c["verdict"] == acc.UNMEASURED


def test_floor_is_the_sampling_error_of_a_proportion_at_least_one_document():
    assert acc.floor("score", 0.5, 0.5, 100) == pytest.approx(2 * math.sqrt(0.25 / 100))   # 0.1
    assert acc.floor("score", 1.0, 1.0, 156) == pytest.approx(1 / 156)                     # p(1-p) = 0
    assert acc.floor("score", 0.99, 1.0, 4) == pytest.approx(0.25)                         # 1/n binds
    assert acc.floor("score", 0.5, 0.5, None) == 0.0                                       # n unknown
    assert acc.floor("score", 30.0, 31.0, 100) == 0.0                                      # not a proportion
    assert acc.floor("relative", 10.0, 10.1, 100) == acc.RELATIVE_FLOOR


def test_floor_decides_when_both_stacks_seeds_agree_exactly():
    # Both seeds of both stacks at 1.0: the seed noise is 0, so only the floor can admit a change.
    n = 156
    one_flip = only(acc.compare(four(MC, 1.0, 1.0, 1 - 1 / n, 1.0, docs=n)))
    assert one_flip["noise_used"] == 0.0 and one_flip["verdict"] == acc.WITHIN
    # Three flipped documents: 0.0192 > 2 sqrt(p(1-p)/n) = 0.0156 at p = 0.990.
    three = only(acc.compare(four(MC, 1.0, 1.0, 1 - 3 / n, 1.0, docs=n)))
    assert three["per_seed"][0]["floor"] == pytest.approx(0.01563, abs=1e-4)
    assert three["verdict"] == acc.OUTSIDE
    # Relative metrics: 0.5 % off with no seed noise is inside the 1 % floor, 2 % is not.
    assert only(acc.compare(four(PPL, 10.0, 10.0, 10.05, 10.0)), PPL)["verdict"] == acc.WITHIN
    assert only(acc.compare(four(PPL, 10.0, 10.0, 10.2, 10.0)), PPL)["verdict"] == acc.OUTSIDE


def test_train_stage_metrics_are_compared_with_the_held_out_row_count():
    runs = [row("hf", 0, {}, heldout_accuracy=1.0, heldout_rows=156, final_loss=0.020),
            row("ours", 0, {}, heldout_accuracy=1 - 1 / 156, heldout_rows=156, final_loss=0.0201),
            row("hf", 1, {}, heldout_accuracy=1.0, heldout_rows=156, final_loss=0.022),
            row("ours", 1, {}, heldout_accuracy=1.0, heldout_rows=156, final_loss=0.021)]
    by = {c["metric"]: c for c in acc.compare(runs)}
    assert set(by) == {acc.HELDOUT, acc.FINAL_LOSS}
    assert by[acc.HELDOUT]["per_seed"][0]["documents"] == 156 and by[acc.HELDOUT]["verdict"] == acc.WITHIN
    assert by[acc.FINAL_LOSS]["kind"] == "relative" and by[acc.FINAL_LOSS]["verdict"] == acc.WITHIN


def test_speed_ratios_per_seed():
    runs = [row("hf", 0, {}, step_s=0.2, tokens_per_s=100.0, peak_memory_gib=10.0),
            row("ours", 0, {}, step_s=0.1, tokens_per_s=200.0, peak_memory_gib=5.0),
            row("hf", 1, {}, step_s=0.2, tokens_per_s=100.0, peak_memory_gib=None)]
    (s,) = acc.speed(runs)
    assert (s["seed"], s["speedup"], s["tokens_per_s_ratio"], s["memory_ratio"]) == (0, 2.0, 2.0, 0.5)


# --------------------------------------------------------------------------- configs and report
def test_run_config_switches_kernels_and_seed_and_leaves_the_base_alone():
    base = acc.base_config({"training": {"batch_size": 4}})
    before = json.dumps(base, sort_keys=True)
    hf, ours = acc.run_config(base, "hf", 1, steps=5), acc.run_config(base, "ours", 1)
    assert hf["kernels"] is False and ours["kernels"] is True
    assert hf["training"]["seed"] == ours["training"]["seed"] == 1
    assert hf["training"]["max_steps"] == 5 and ours["training"]["max_steps"] == base["training"]["max_steps"]
    assert hf["training"]["batch_size"] == 4 and hf["data"] == base["data"]
    assert hf["model"]["path"] == "builtin:tiny-llama"
    assert json.dumps(base, sort_keys=True) == before                            # the base is not modified
    switches = acc.base_config({"kernels": {"rope": False}})
    assert acc.run_config(switches, "ours", 0)["kernels"] == {"rope": False}
    assert acc.run_config(switches, "hf", 0)["kernels"] is False


def test_base_config_reads_a_yaml_file_and_rejects_bad_input(tmp_path):
    from workbench import config as wconfig
    from workbench.errors import UserError

    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": "train.jsonl"}, "training": {"max_steps": 3}}))
    base = acc.base_config(path)
    assert base["data"]["train"] == str(tmp_path / "train.jsonl") and base["training"]["max_steps"] == 3
    wconfig.from_dict(acc.run_config(base, "ours", 2))   # what run() writes is a valid config
    with pytest.raises(UserError, match="unknown config key"):
        acc.base_config({"trainig": {}})
    with pytest.raises(UserError, match="stacks take"):
        acc.run(None, tmp_path / "out", stacks=("hf", "liger"))
    with pytest.raises(UserError, match="distinct"):
        acc.run(None, tmp_path / "out", seeds=(0, 0))


def _result(runs):
    comparisons = acc.compare(runs)
    return {"config": acc.base_config(None), "seeds": [0, 1], "stacks": ["hf", "ours"], "steps": 800, "tasks": None,
            "limit": None, "device": "cuda", "runs": runs, "comparisons": comparisons, "speed": acc.speed(runs),
            "ok": acc.passed(runs, comparisons)}


def test_markdown_and_plot(tmp_path):
    runs = four(MC, 0.80, 0.70, 0.78, 0.74)
    for r, ppl in zip(runs, (10.0, 10.3, 10.5, 10.4)):
        r["metrics"][PPL] = ppl
        r["documents"]["wb_heldout_ppl"] = 156
        r.update(step_s=0.2 if r["stack"] == "hf" else 0.1, tokens_per_s=100.0, peak_memory_gib=2.0, steps=800)
    runs[3]["metrics"][MC] = 0.50                                    # ours seed 1 outside
    result = _result(runs)
    env = {"device": "NVIDIA H200", "date": "2026-01-01", "torch": "x", "cuda": "13.0", "triton": "3.6.0",
           "transformers": "x", "peft": "x", "trl": "x", "lm_eval": "0.4.13"}
    text = acc.markdown(result, env, "workbench bench accuracy", "acc.png")
    assert "| wb_heldout_ppl word_perplexity | 10 | 10.3 | +3.00% | 10.5 | 10.4 | -0.95% | 5.00% | 0.97% | 1.00% " \
           "| within noise |" in text
    assert "| wb_synthetic_mc acc | 0.8 | 0.78 | -0.0200 | 0.7 | 0.5 | -0.2000 | 0.1000 | 0.2800 |" in text
    assert "**OUTSIDE NOISE** (ours worse)" in text and "NOT within noise" in text
    assert "| 0 | 2.00x | 1.00 | 1.00 |" in text and "![hf and ours per seed](acc.png)" in text
    png = acc.plot(result, tmp_path / "acc.png")
    assert png.stat().st_size > 1000
    # A result with a missing value still renders (dashes, MISSING).
    runs[0]["metrics"][MC] = float("nan")
    text = acc.markdown(_result(runs), env, "cmd")
    assert "**MISSING**" in text and "| — | 0.78 | — |" in text
    assert acc.plot(_result(runs), tmp_path / "missing.png").stat().st_size > 1000


def test_a_failing_training_is_a_row_with_its_error_not_a_crash(tmp_path):
    # A model folder that does not exist passes config validation and fails in the train process.
    result = acc.run({"model": {"path": str(tmp_path / "no-such-model")}}, tmp_path / "out", seeds=(0,),
                     stacks=("hf",), steps=1, progress=lambda _: None)
    (r,) = result["runs"]
    assert r["train_exit_code"] != 0 and r["exit_code"] == r["train_exit_code"] and r["eval_exit_code"] is None
    assert r["error"].startswith("train: ") and len(r["error"]) > len("train: ")
    assert not result["ok"] and result["comparisons"] == []


def test_run_bookkeeping_with_stub_processes(tmp_path, monkeypatch):
    """The commands run() launches, what it reads back, and
    a failing eval: the row keeps the train numbers, records the eval's last stderr line
    and exit code, and the suite goes on to the next run."""
    import subprocess

    calls = []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        stage, run_dir = argv[3], __import__("pathlib").Path(argv[argv.index("--run") + 1])
        if stage == "train":
            cfg = yaml.safe_load(open(argv[argv.index("--config") + 1]))
            (run_dir / "train").mkdir(parents=True)
            record = {"tokens_per_s": 50.0, "peak_memory_gib": None, "final_loss": 1.0 + cfg["training"]["seed"],
                      "steps": 2, "timings": {"train_s": 1.0}, "eval": {"base": 0.0, "adapter": 0.5},
                      "kernels": {"swapped": {"rms_norm": {"LlamaRMSNorm": 9}}} if cfg["kernels"] else None}
            (run_dir / "manifest.json").write_text(json.dumps({"stages": {"train": record}}))
            (run_dir / "train" / "eval.json").write_text(json.dumps({"adapter": {"rows": 4}}))
            return subprocess.CompletedProcess(argv, 0, "", "")
        if "ours-seed1" in str(run_dir):
            return subprocess.CompletedProcess(argv, 2, "", "lm-eval noise\nworkbench: error: eval broke\n")
        (run_dir / "eval" / "adapter").mkdir(parents=True)
        (run_dir / "eval" / "adapter" / "results.json").write_text(json.dumps({
            "results": {"wb_synthetic_mc": {"acc,none": 0.5, "acc_stderr,none": 0.1, "sample_len": 4}},
            "n-samples": {"wb_synthetic_mc": {"original": 156, "effective": 4}}}))
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(acc.child, "run_child", fake_run)
    (tmp_path / "out" / "hf-seed0" / "train").mkdir(parents=True)   # an earlier invocation's: removed first
    result = acc.run(None, tmp_path / "out", steps=2, tasks=["wb_synthetic_mc"], limit=4, progress=lambda _: None)
    out = (tmp_path / "out").resolve()
    assert [(a[3], a[-1] if a[3] == "train" else a[5]) for a in calls][:2] == [
        ("train", str(out / "hf-seed0")), ("eval", str(out / "hf-seed0"))]
    assert calls[1][4:] == ["--run", str(out / "hf-seed0"), "--models", "adapter", "--tasks", "wb_synthetic_mc",
                               "--limit", "4"]
    assert len(calls) == 8
    runs = {(r["stack"], r["seed"]): r for r in result["runs"]}
    ok, bad = runs[("ours", 0)], runs[("ours", 1)]
    assert (ok["exit_code"], ok["step_s"], ok["heldout_rows"], ok["documents"]) == (0, 0.5, 4, {"wb_synthetic_mc": 4})
    assert ok["metrics"] == {MC: 0.5} and ok["kernels"]["swapped"]
    assert (bad["train_exit_code"], bad["eval_exit_code"], bad["exit_code"]) == (0, 2, 2)
    assert bad["error"] == "eval: workbench: error: eval broke" and bad["final_loss"] == 2.0 and "metrics" not in bad
    by = {c["metric"]: c for c in result["comparisons"]}
    assert by[MC]["verdict"] == acc.MISSING and by[MC]["missing"] == ["ours seed 1"]
    assert by[acc.HELDOUT]["verdict"] == acc.WITHIN            # the train stage's numbers of that run still count
    assert not result["ok"] and result["steps"] == 2 and result["limit"] == 4


def test_a_skipped_train_eval_is_not_compared_but_a_lost_one_is_missing(tmp_path):
    # eval.max_rows: 0 -> the train record's eval is {} in every run: no held-out accuracy row at all.
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": {"train": {
        "steps": 2, "timings": {"train_s": 1.0}, "final_loss": 1.0, "eval": {}}}}))
    r = acc._metrics_of_run(tmp_path, json.loads((tmp_path / "manifest.json").read_text())["stages"]["train"])
    assert "heldout_accuracy" not in r and r["step_s"] == 0.5
    runs = [row(s, seed, {}, final_loss=1.0 + seed) for seed in (0, 1) for s in ("hf", "ours")]
    assert [c["metric"] for c in acc.compare(runs)] == [acc.FINAL_LOSS]
    runs[1].update(heldout_accuracy=0.9, heldout_rows=100)          # only ours seed 0 has it: the others lack it
    assert only(acc.compare(runs), acc.HELDOUT)["verdict"] == acc.MISSING


# --------------------------------------------------------------------------- --jobs
class FakeStages:
    """bench/child.py's run_child as run() calls it: writes what the real train and eval
    processes would, with numbers that depend on the seed and stack (ours seed 1's eval fails),
    after a pause that is twice as long for hf (so pipelines finish out of the serial
    order); records every call's extra arguments (env) and the most calls in flight at
    once. ``barrier``: every call waits there for another one (fails if none comes)."""

    def __init__(self, pause=0.0, barrier=None):
        self.pause, self.barrier, self.lock = pause, barrier, threading.Lock()
        self.active = self.max_active = 0
        self.calls = []

    def __call__(self, argv, **kwargs):
        assert list(argv[1:3]) == ["-m", "workbench"]
        extra = kwargs
        stage, run_dir = argv[3], Path(argv[argv.index("--run") + 1])
        stack, seed = run_dir.name.split("-seed")
        seed, ours = int(seed), stack == "ours"
        with self.lock:
            self.calls.append((stage, run_dir.name, extra))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.barrier is not None:
                self.barrier.wait()
            time.sleep(self.pause * (1 if ours else 2))
            if stage == "train":
                (run_dir / "train").mkdir(parents=True)
                record = {"tokens_per_s": 200.0 if ours else 100.0, "peak_memory_gib": 3.0 if ours else 4.0,
                          "final_loss": 1.0 + 0.1 * seed + 0.001 * ours, "steps": 2,
                          "timings": {"train_s": 1.0 if ours else 3.0},
                          "eval": {"base": 0.0, "adapter": 0.5 + 0.1 * seed},
                          "kernels": {"swapped": {"rms_norm": {"LlamaRMSNorm": 9}}} if ours else None}
                (run_dir / "manifest.json").write_text(json.dumps({"stages": {"train": record}}))
                (run_dir / "train" / "eval.json").write_text(json.dumps({"adapter": {"rows": 10}}))
                return subprocess.CompletedProcess(argv, 0, "", "")
            if ours and seed == 1:
                return subprocess.CompletedProcess(argv, 3, "", "workbench: error: eval broke\n")
            (run_dir / "eval" / "adapter").mkdir(parents=True)
            (run_dir / "eval" / "adapter" / "results.json").write_text(json.dumps({
                "results": {"wb_synthetic_mc": {"acc,none": 0.5 + 0.05 * seed + 0.01 * ours}},
                "n-samples": {"wb_synthetic_mc": {"original": 156, "effective": 100}}}))
            return subprocess.CompletedProcess(argv, 0, "", "")
        finally:
            with self.lock:
                self.active -= 1


def _untimed(runs):
    return [{k: v for k, v in r.items() if k not in ("train_wall_s", "eval_wall_s")} for r in runs]


ENV = {"device": "NVIDIA H200", "date": "2026-01-01", "torch": "x", "cuda": "13.0", "triton": "3.6.0",
       "transformers": "x", "peft": "x", "trl": "x", "lm_eval": "0.4.13"}


def test_jobs_give_the_serial_runs_in_the_serial_order(tmp_path, monkeypatch):
    """jobs=2 (hf's stages slower, so ours finishes first) gives the rows, comparisons,
    verdict and accuracy table of jobs=1 in the same order; the processes' environment
    is inherited at jobs=1 and capped to cpu count // 2 threads at jobs=2."""
    monkeypatch.setattr(acc.os, "cpu_count", lambda: 8)
    serial_fake, parallel_fake = FakeStages(pause=0.02), FakeStages(pause=0.02)
    lines = {1: [], 2: []}
    monkeypatch.setattr(acc.child, "run_child", serial_fake)
    serial = acc.run(None, tmp_path, steps=2, progress=lines[1].append)
    monkeypatch.setattr(acc.child, "run_child", parallel_fake)
    parallel = acc.run(None, tmp_path, steps=2, progress=lines[2].append, jobs=2)
    assert [(r["stack"], r["seed"]) for r in parallel["runs"]] == [("hf", 0), ("ours", 0), ("hf", 1), ("ours", 1)]
    assert _untimed(parallel["runs"]) == _untimed(serial["runs"])
    assert parallel["comparisons"] == serial["comparisons"] and parallel["ok"] == serial["ok"] is False
    assert {c["metric"]: c["verdict"] for c in serial["comparisons"]}[MC] == acc.MISSING   # ours seed 1's eval
    assert serial["runs"][3]["error"] == "eval: workbench: error: eval broke"
    section = "## Accuracy"
    md = {n: acc.markdown(r, ENV, "cmd") for n, r in ((1, serial), (2, parallel))}
    assert md[2][md[2].index(section):] == md[1][md[1].index(section):]
    assert (serial["jobs"], parallel["jobs"], serial["threads_per_process"], parallel["threads_per_process"]) \
        == (1, 2, None, 4)
    # Every progress line names its seed and stack (the failure too), in both modes.
    for n in (1, 2):
        named = [line for line in lines[n] if line.startswith("[bench accuracy] seed ")]
        assert len(named) == 9 and "[bench accuracy] seed 1 ours: failed: eval: workbench: error: eval broke" in named
    assert all(extra.get("env") is None for _, _, extra in serial_fake.calls)   # inherited, as before --jobs
    envs = [extra["env"] for _, _, extra in parallel_fake.calls]
    assert len(envs) == 8 and all(e["OMP_NUM_THREADS"] == e["MKL_NUM_THREADS"] == "4" for e in envs)
    assert envs[0]["PATH"] == acc.os.environ["PATH"]                           # the rest of ours is kept


def test_jobs_run_pipelines_at_the_same_time(tmp_path, monkeypatch):
    """Every stage waits at a barrier for another one: only concurrent pipelines get past
    it (one after another, the first call times out and the suite raises)."""
    fake = FakeStages(barrier=threading.Barrier(2, timeout=5))
    monkeypatch.setattr(acc.child, "run_child", fake)
    result = acc.run(None, tmp_path, steps=2, progress=lambda _: None, jobs=2)
    assert fake.max_active == 2 and len(fake.calls) == 8
    assert [r["exit_code"] for r in result["runs"]] == [0, 0, 0, 3]
    serial = FakeStages(pause=0.01)
    monkeypatch.setattr(acc.child, "run_child", serial)
    acc.run(None, tmp_path, steps=2, progress=lambda _: None)
    assert serial.max_active == 1                                                # jobs=1: one at a time


def test_with_jobs_the_report_says_speed_is_not_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(acc.os, "cpu_count", lambda: 3)                      # 3 // 2 = 1 thread each
    monkeypatch.setattr(acc.child, "run_child", FakeStages())
    serial = acc.run(None, tmp_path, steps=2, progress=lambda _: None)
    parallel = acc.run(None, tmp_path, steps=2, progress=lambda _: None, jobs=2)
    assert serial["speed_measured"] is True and serial["speed_note"] is None
    assert serial["speed"][0] == {"seed": 0, "speedup": 3.0, "tokens_per_s_ratio": 2.0, "memory_ratio": 0.75}
    doc = json.loads(json.dumps(parallel))
    assert doc["jobs"] == 2 and doc["speed_measured"] is False and doc["speed_note"].startswith("not measured")
    # Per-process peak memory is still a measurement; no speed key is there to be read as one.
    assert doc["speed"] == [{"seed": 0, "memory_ratio": 0.75}, {"seed": 1, "memory_ratio": 0.75}]
    timed, untimed = acc.markdown(serial, ENV, "cmd"), acc.markdown(parallel, ENV, "cmd")
    assert "| 0 | 3.00x | 2.00 | 0.75 |" in timed and "| step s | tokens/s |" in timed
    assert "## Speed: not measured in this run" not in timed
    assert "## Speed: not measured in this run" in untimed and "rerun with `--jobs 1` to measure speed" in untimed
    assert "up to 2 (seed, stack) pipelines at once (`--jobs 2`), 1 CPU thread(s) per process" in untimed
    assert "| 0 | 0.75 |" in untimed and "| 1 | 0.75 |" in untimed
    # Neither a ratio nor a run's step time or tokens/s is printed.
    for number in ("3.00x", "| 2.00 |", "step s", "| 1.5000 |", "| 0.5000 |", "| 100 |", "| 200 |"):
        assert number not in untimed, number
    assert "| 0 | hf | 0 | 2 | 4.00 | 1.0000 | 0.500 |  |" in untimed


@pytest.mark.parametrize("jobs", [0, -1, 1.5, True, "2"])
def test_jobs_below_one_or_not_an_integer_are_refused(tmp_path, monkeypatch, jobs):
    monkeypatch.setattr(acc.child, "run_child", FakeStages())
    with pytest.raises(UserError, match=r"jobs \(--jobs\) must be a whole number of at least 1, got .*; pass 1"):
        acc.run(None, tmp_path, steps=2, progress=lambda _: None, jobs=jobs)
    assert not any(tmp_path.iterdir())                                           # refused before anything ran


def test_cli_jobs(tmp_path, monkeypatch, capsys):
    """--jobs reaches run(): 0 is a one-sentence error (exit 2); 2 writes a JSON report that
    records the jobs and that speed was not measured."""
    from workbench.cli import main

    monkeypatch.setenv("TRITON_INTERPRET", "1")      # what the CLI would set on a CPU host; restored afterwards
    monkeypatch.setattr(acc.child, "run_child", FakeStages())
    assert main(["bench", "accuracy", "--jobs", "0", "--run", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("workbench: error: jobs (--jobs) must be a whole number of at least 1, got 0;")
    assert len(err.splitlines()) == 1
    code = main(["bench", "accuracy", "--jobs", "2", "--steps", "2", "--run", str(tmp_path / "runs"),
                 "--report", str(tmp_path / "report")])
    assert code == 1                                                             # ours seed 1's eval failed
    (report,) = (tmp_path / "report").glob("*.json")
    doc = json.loads(report.read_text())
    assert (doc["jobs"], doc["speed_measured"], doc["suite"]) == (2, False, "accuracy")
    assert "not measured" in doc["speed_note"] and "speedup" not in doc["speed"][0]
    assert "## Speed: not measured in this run" in report.with_suffix(".md").read_text()


# --------------------------------------------------------------------------- end to end (CPU)
def test_smoke_both_stacks_two_seeds_end_to_end(tmp_path):
    """Both stacks and two seeds of the built-in default, 2 steps each, through the real
    train and eval processes. Small batch, few eval rows and tokens: our kernels run in
    Triton's interpreter here (about 62 s on 2 cores, ~half of it the two ours trainings)."""
    small = {"training": {"batch_size": 1, "logging_steps": 1, "schedule": "constant", "warmup_ratio": 0.0},
             "eval": {"max_rows": 4, "max_new_tokens": 4}, "data": {"builtin_rows": 200}}
    lines = []
    result = acc.run(small, tmp_path, steps=2, limit=4, progress=lines.append)
    runs = {(r["stack"], r["seed"]): r for r in result["runs"]}
    assert list(runs) == [("hf", 0), ("ours", 0), ("hf", 1), ("ours", 1)]
    for (stack, seed), r in runs.items():
        assert (r["train_exit_code"], r["eval_exit_code"], r.get("error")) == (0, 0, None), r
        written = yaml.safe_load((tmp_path / f"{stack}-seed{seed}.yaml").read_text())
        assert written["kernels"] is (stack == "ours") and written["training"]["seed"] == seed
        assert written["training"]["max_steps"] == 2 and written["training"]["batch_size"] == 1
        assert r["steps"] == 2 and r["tokens_per_s"] > 0 and r["step_s"] > 0 and math.isfinite(r["final_loss"])
        assert r["heldout_rows"] == 4 and r["documents"] == {"wb_synthetic_mc": 4, "wb_synthetic_gen": 4,
                                                             "wb_heldout_ppl": 4}
        assert (r["kernels"] is None) == (stack == "hf")
        if stack == "ours":
            assert r["kernels"]["calls_in_training"], r["kernels"]    # the kernels really ran
        manifest = json.loads((tmp_path / f"{stack}-seed{seed}" / "manifest.json").read_text())
        assert manifest["stages"]["eval"]["metrics"]["adapter"] == r["metrics"]
    names = {c["metric"] for c in result["comparisons"]}
    assert names == {acc.HELDOUT, acc.FINAL_LOSS, MC, "wb_synthetic_mc acc_norm",
                     "wb_synthetic_gen exact_match [strip]", PPL, "wb_heldout_ppl byte_perplexity",
                     "wb_heldout_ppl bits_per_byte"}
    # The two seeds differ (init and data order); hf and ours at one seed differ only by the kernels'
    # fp32 reordering (roundoff ~1e-7 a step, over 2 steps), so 1e-3 catches a changed loss or
    # gradient with orders of magnitude to spare; their numerical parity is tests/test_model_parity.py's.
    loss = only(result["comparisons"], acc.FINAL_LOSS)
    assert loss["noise"]["hf"] > 0 and all(abs(p["diff"]) < 1e-3 for p in loss["per_seed"])
    assert result["ok"], [(c["metric"], c["verdict"]) for c in result["comparisons"]]
    assert len(result["speed"]) == 2 and result["device"] in ("cpu", "cuda")
    assert sum("lm-eval on the adapter" in line for line in lines) == 4
