"""Maximum-context search: the longest sequence a training step fits in, per stack.

For each (mode, stack), ``workbench train`` runs a few steps at batch 1 on sequences of
exactly L tokens (the built-in rows wrapped-packed, as in the train suite), each trial in
its own process. L doubles from ``start`` while the run fits, then the gap between the
last length that fitted and the first that ran out of memory is bisected down to
``granularity`` tokens. A trial "does not fit" only when the train stage reports running
out of GPU memory; any other failure stops that stack's search and is reported as such,
so a crash is never mistaken for a memory limit.

With ``devices`` (several GPUs of one host), the (mode, stack) searches run at the same time,
one per GPU: each device takes the next search in the order given, and each trial is still a
process alone on its GPU (``CUDA_VISIBLE_DEVICES``), so a trial's memory is its own. A search
is about memory, not speed, so sharing the host does not change what it measures.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

from workbench.bench import child
from workbench.markdown import table

#: What the train stage says when a step ran out of GPU memory (workbench.trainer.oom_message).
OOM_MARK = "ran out of GPU memory"


def search(trial: Callable[[int], dict], start: int = 2048, limit: int = 131072, granularity: int = 1024) -> dict:
    """``trial(L)`` -> {"fits": bool, ...} or {"error": str}. Returns the longest L that
    fitted (None if not even ``start`` did), the first L that did not (None if ``limit``
    fitted), every trial in order, and the error that stopped the search, if any."""
    trials: list[dict] = []

    def attempt(length: int) -> dict:
        result = {"seq": length, **trial(length)}
        trials.append(result)
        return result

    fit, miss, length, error = None, None, min(start, limit), None
    while True:
        r = attempt(length)
        if "error" in r:
            error = r["error"]
            break
        if not r["fits"]:
            miss = length
            break
        fit = length
        if length >= limit:
            break
        length = min(length * 2, limit)  # the last doubling is clamped, so ``limit`` itself is tried
    if error is None and fit is not None and miss is not None:
        lo, hi = fit, miss
        while hi - lo > granularity:
            mid = (lo + hi) // 2 // granularity * granularity
            if mid <= lo:
                break
            r = attempt(mid)
            if "error" in r:
                error = r["error"]
                break
            lo, hi = (mid, hi) if r["fits"] else (lo, mid)
        fit, miss = lo, hi
    return {"max_fit": fit, "first_miss": miss, "granularity": granularity, "trials": trials, "error": error}


def train_trial(checkpoint: Path, mode: str, stack: str, out: Path, steps: int = 2,
                device: str | None = None) -> Callable[[int], dict]:
    """A trial function for :func:`search`: one training process at batch 1 on ``stack``
    (bench/child.py), on ``device`` (a ``CUDA_VISIBLE_DEVICES`` value) when one is given."""
    import yaml

    from workbench.bench.train import config_for, stack_env

    env = stack_env(stack)
    if device is not None:
        env = {**(env or os.environ), "CUDA_VISIBLE_DEVICES": device}

    def trial(seq: int) -> dict:
        run_dir = out / f"{mode}-{stack}-{seq}"
        cfg_path = out / f"{mode}-{stack}-{seq}.yaml"
        cfg_path.write_text(yaml.safe_dump(config_for(checkpoint, mode, stack, steps, 1, 0, seq)))
        trained = child.train(cfg_path, run_dir, stack, env=env)
        if trained.record is not None:
            rec = trained.record
            # Batch 1: each fingerprinted micro-batch (workbench.data.batch_fingerprint, recorded
            # for every stack, Unsloth's too, whose log has no token count) is one full sequence.
            held = [fp.get("tokens") for fp in rec.get("data_fingerprint") or []]
            if not held or any(n != seq for n in held):
                return {"error": f"the trial's first micro-batches held {held or 'no recorded'} tokens, not {seq} "
                                 "each", "wall_s": trained.wall_s}
            return {"fits": True, "wall_s": trained.wall_s, "peak_memory_gib": rec.get("peak_memory_gib"),
                    "peak_reserved_gib": rec.get("peak_reserved_gib"),
                    "step_s": round(rec["timings"]["train_s"] / rec["steps"], 4) if rec.get("steps") else None}
        if OOM_MARK in trained.stderr:
            return {"fits": False, "wall_s": trained.wall_s}
        return {"error": f"exit code {trained.exit_code}: {trained.error}", "wall_s": trained.wall_s}

    return trial


def run(shape: str, modes, stacks, out: str | Path, start: int = 2048, limit: int = 131072,
        granularity: int = 1024, steps: int = 2, progress: Callable[[str], None] = print,
        partial: Callable[[dict], None] | None = None, devices: list[str] | None = None) -> dict:
    """Search every (mode, stack). ``steps`` optimizer steps per trial: the first step allocates
    the optimizer state, the second shows a peak that persists beyond it. ``partial`` gets the
    result so far after every trial, marked ``incomplete``, each (mode, stack) in
    search with what its trials have shown yet, so a search stopped midway leaves a report.
    ``devices``: ``CUDA_VISIBLE_DEVICES`` values; with more than one, that many searches run at
    once, one per device (the rows keep the order of ``modes`` x ``stacks``)."""
    from workbench.bench.train import SHAPES, write_checkpoint

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # A limit beyond the shape's position limit raises it (and names the checkpoint for it, so
    # a shorter one written earlier is not reused): the search then measures memory there.
    positions = SHAPES[shape]["max_position_embeddings"]
    raised = limit if limit > positions else None
    checkpoint = write_checkpoint(shape, out / (f"base-{shape}" + (f"-pos{raised}" if raised else "")),
                                  positions=raised)
    head = {"shape": shape, "shape_dims": SHAPES[shape], "positions_raised_to": raised, "batch": 1,
            "start": start, "limit": limit, "granularity": granularity, "steps": steps}
    if devices:
        head["devices"] = list(devices)
    planned = [(mode, stack) for mode in modes for stack in stacks]
    rows: dict[tuple[str, str], dict] = {}      # finished searches
    searching: dict[tuple[str, str], tuple[list[dict], str | None]] = {}  # (trials so far, device)
    lock = threading.Lock()

    def snapshot() -> dict:
        shown = []
        for key in planned:
            if key in rows:
                shown.append(rows[key])
            elif key in searching:
                done, device = searching[key]
                shown.append(_searching(*key, done, granularity, device))
        return {**head, "rows": shown, "incomplete": {"done": len(rows), "planned": len(planned)}}

    def search_one(mode: str, stack: str, device: str | None) -> None:
        base = train_trial(checkpoint, mode, stack, out, steps, device)
        done: list[dict] = []
        where = f"GPU {device}: " if device is not None and len(devices) > 1 else ""
        with lock:
            searching[(mode, stack)] = (done, device)

        def trial(seq):
            progress(f"[bench context] {where}{shape} {mode} {stack}: {seq} tokens")
            r = base(seq)
            progress(f"[bench context] {where}  {mode} {stack} {seq}: "
                     f"{'fits' if r.get('fits') else r.get('error') or 'out of memory'}")
            with lock:
                done.append({"seq": seq, **r})
                if partial is not None:
                    partial(snapshot())
            return r

        row = {"mode": mode, "stack": stack, **search(trial, start, limit, granularity)}
        if device is not None:
            row["device"] = device
        with lock:
            rows[(mode, stack)] = row
            del searching[(mode, stack)]

    if not devices or len(devices) == 1:
        for mode, stack in planned:
            search_one(mode, stack, devices[0] if devices else None)
    else:
        _in_parallel(planned, devices, search_one)
    return {**head, "rows": [rows[key] for key in planned]}


def _in_parallel(planned: list[tuple[str, str]], devices: list[str], search_one) -> None:
    """One thread per device, each taking the next (mode, stack) until none is left. A
    stop in the main thread (SIGTERM under workbench.cli, Ctrl-C) kills the trials in flight
    and no further trial starts; a failure in a thread is raised here once all have ended."""
    queue = list(planned)
    stop = threading.Event()
    failures: list[BaseException] = []
    take = threading.Lock()

    ended = {d: threading.Event() for d in devices}

    def worker(device: str) -> None:
        try:
            while not stop.is_set():
                with take:
                    if not queue:
                        return
                    mode, stack = queue.pop(0)
                try:
                    search_one(mode, stack, device)
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    if not stop.is_set():
                        failures.append(exc)
                    stop.set()
                    return
        finally:
            ended[device].set()

    threads = [threading.Thread(target=worker, args=(d,), name=f"context-search-{d}") for d in devices]
    for t in threads:
        t.start()
    # The main thread waits on events, not Thread.join: before Python 3.13 a join interrupted
    # by a signal can leave the thread looking finished, and a later join returns at once.
    try:
        for event in ended.values():
            while not event.wait(timeout=0.5):
                pass
    except BaseException:
        stop.set()
        child.kill_children()
        for event in ended.values():
            while not event.wait(timeout=0.5):
                child.kill_children()  # a trial started after the first kill
        raise
    if failures:
        raise failures[0]


def _searching(mode: str, stack: str, trials: list[dict], granularity: int, device: str | None = None) -> dict:
    """A row for a search still under way: the longest length that fitted and the shortest
    that did not, so far."""
    fits = [t["seq"] for t in trials if t.get("fits")]
    misses = [t["seq"] for t in trials if t.get("fits") is False]
    row = {"mode": mode, "stack": stack, "max_fit": max(fits, default=None), "first_miss": min(misses, default=None),
           "granularity": granularity, "trials": list(trials), "error": None, "searching": True}
    if device is not None:
        row["device"] = device
    return row


def markdown(result: dict, env: dict, command: str) -> str:
    from workbench.bench.train import incomplete_line

    lines = [f"# Maximum context — {env['device']} — {env['date']}", "",
             *incomplete_line(result, "(mode, stack) searches"),
             f"- **Command:** `{command}`",
             f"- **Model:** `{result['shape']}` with random weights; LoRA r16 on all seven projections; QLoRA: "
             f"bitsandbytes NF4, double quant; batch 1, {result.get('steps', 2)} steps per trial, each trial in its own "
             "process." + (f" Its position limit ({result['shape_dims']['max_position_embeddings']}) is raised to "
                           f"{result['positions_raised_to']} for this search: beyond what the real model was trained "
                           "on, so lengths past it measure memory and speed only."
                           if result.get("positions_raised_to") else ""),
             f"- **Search:** doubling from {result['start']} tokens up to {result['limit']}, then bisection down to "
             f"{result.get('granularity', 1024)} tokens; a length \"does not fit\" only when training ran out of GPU "
             "memory.",
             *([f"- **GPUs:** {len(result['devices'])} of this host (`CUDA_VISIBLE_DEVICES` "
                f"{', '.join(result['devices'])}), one search on each at a time; each trial is a process alone on "
                "its GPU, so its memory is its own. The note column names each search's GPU."]
               if len(result.get("devices") or []) > 1 else []),
             f"- **Versions:** torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, transformers "
             f"{env['transformers']}, peft {env['peft']}", ""]
    rows = []
    for r in result["rows"]:
        best = next((t for t in r["trials"] if t["seq"] == r["max_fit"] and t.get("fits")), {})
        peak, reserved, step = (best.get(k) for k in ("peak_memory_gib", "peak_reserved_gib", "step_s"))
        searching = r.get("searching")
        miss = r["first_miss"] or (f"(none up to {result['limit']})" if r["max_fit"] and not r["error"]
                                   and not searching else "—")
        note = r["error"] or ("search not finished: the bounds so far" if searching else "")
        if len(result.get("devices") or []) > 1 and r.get("device") is not None:
            note = "; ".join(filter(None, [f"GPU {r['device']}", note]))
        rows.append([r["mode"], r["stack"], str(r["max_fit"] or "—"), str(miss), _num(peak, ".2f"),
                     _num(reserved, ".2f"), _num(step, ".2f"), str(len(r["trials"])), note])
    lines += table(["mode", "stack", "longest that fits", "first that does not", "peak GiB at the longest",
                    "reserved GiB", "step s at the longest", "trials", "note"], rows, align="llrrrrrrl")
    return "\n".join(lines) + "\n"


def _num(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)
