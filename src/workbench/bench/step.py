"""The plain-loop training step, per stack: ``workbench bench step``.

The loop is the one peers publish, with no TRL and no dataloader around it::

    with torch.autocast("cuda", dtype=torch.bfloat16):   # --autocast on; nothing with off
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)

AdamW over the trainable (LoRA) parameters; one batch of random tokens from a fixed seed,
the same in every process. Every (shape, mode, autocast, stack) runs in its own process
(bench/child.py) from the same random-weight checkpoint (bench/train.write_checkpoint);
the stacks are bench/stacks.py's strategies, named as in the train suite: the optional ones
(liger, unsloth) are skipped with the reason where they cannot run, and Unsloth's processes
get WORKBENCH_UNSLOTH_SITE first on PYTHONPATH (bench/train.stack_env). Per record: the
median step time after the warm-up, tokens/s, MFU against the device's bf16 matmul rate
measured in that process (FLOPs: :func:`flops_per_step`), peak allocated and reserved
memory, the loss at every step
and its agreement with hf (the train suite's band); with ``profile``, a few more steps under
torch.profiler: the top kernels per step and the share of the step the GPU sits idle.
Nothing here asserts a speed: the numbers go to the suite's report.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from workbench.bench import train as tbench
from workbench.bench.stacks import STACKS
from workbench.markdown import table

LR = 2e-4  # the train suite's
AUTOCAST = ("on", "off")
#: Steps profiled after the timed ones (a few: each adds to the trace's size).
PROFILE_STEPS = 3
#: The matmul that measures the device's bf16 rate: n x n by n x n, timed REPS times.
GEMM_N, GEMM_REPS = 8192, 10
#: Kernels the Markdown shows per profiled stack (the CSV has them all).
TOP = 15
#: Chrome traces larger than this are gzipped (a 1B step holds thousands of kernels).
GZIP_ABOVE = 1 << 20

FLOPS_TEXT = """\
**FLOPs per step** (model FLOPs; T = batch x seq tokens, S = seq, L layers, d_attn = heads x head_dim):
- N = the frozen weights every token is multiplied by: per layer q, k, v, o, gate, up and down, plus the LM head
  (vocab x hidden, counted also where it is tied to the embedding, whose lookup is no matmul);
  N_lora = the LoRA weights, r x (in + out) per adapted projection.
- Forward: 2·(N + N_lora)·T for the matmuls, plus attention A = 2·L·T·S·d_attn: QKᵀ and PV cost 2·T·S·d_attn
  each over the full square, and the causal mask halves that (FlashAttention-style kernels skip the masked
  blocks), so we count half.
- Backward: 2·(N + N_lora)·T for the activation gradients (one matmul per forward matmul), 2·N_lora·T for the
  LoRA weight gradients (the frozen weights need no weight-gradient GEMMs), and 2·A for attention (dQ, dK, dV
  and dP).
- **F = 4·N·T + 6·N_lora·T + 3·A.** Not counted: checkpointing's recompute (useful work is the same, so a -gc
  stack's MFU drops by what it recomputes), QLoRA's dequantization, norms, RoPE, softmax, the optimizer.
- **MFU = F / step time / R**, with R the device's bf16 matmul rate measured in the same process
  (`torch.mm` of two {n} x {n} bf16 matrices, {reps} timed after 3 untimed). R is below the datasheet peak,
  so this MFU is higher than one against the datasheet. On the CPU there is no MFU."""


def flops_per_step(config: dict, batch: int, seq: int, lora_r: int, targets=None) -> dict:
    """Model FLOPs of one LoRA training step (FLOPS_TEXT says what is counted). ``config``: the
    checkpoint's config.json; ``targets``: the adapted projections (default: all seven)."""
    from workbench.config import DEFAULT_TARGET_MODULES

    targets = DEFAULT_TARGET_MODULES if targets is None else targets
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // heads
    shapes = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    n = layers * sum(a * b for a, b in shapes.values()) + config["vocab_size"] * h
    n_lora = layers * sum(lora_r * (a + b) for name, (a, b) in shapes.items() if name in targets)
    tokens = batch * seq
    attention = 2 * layers * tokens * seq * heads * hd
    return {"total": 4 * n * tokens + 6 * n_lora * tokens + 3 * attention, "frozen_matmul_params": n,
            "lora_params": n_lora, "tokens": tokens, "attention_forward": attention}


def mfu(flops: float, step_s: float, rate: float | None) -> float | None:
    """The fraction of the measured matmul rate the step's model FLOPs reach (None without a rate)."""
    return flops / step_s / rate if rate and step_s else None


# --------------------------------------------------------------------------- the suite (launcher)
def run(shapes, modes, stacks, autocasts=("on",), batch: int = 4, seq: int = 2048, steps: int = 10, warmup: int = 3,
        out: str | os.PathLike = "runs/bench-step", seed: int = 0, profile_dir: Path | None = None,
        profile_steps: int = PROFILE_STEPS, progress: Callable[[str], None] = print,
        partial: Callable[[dict], None] | None = None, cuda_graph: bool = False) -> dict:
    """Every (shape, mode, autocast, stack) in its own process, hf first in each group.
    ``partial`` gets the result so far after each record, marked ``incomplete``.
    ``cuda_graph``: every stack's step captured once after the warm-up as one CUDA graph and
    replayed for the timed steps (:func:`child`).
    ``profile_dir``: profile ``profile_steps`` more steps of each record, their CSV and trace there."""
    from workbench.offline import enforce_offline

    enforce_offline()  # in os.environ, so every process this launches (the checkpoint's too) runs offline
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names, skipped = tbench.available_stacks(stacks)
    for stack, why in skipped.items():
        progress(f"[bench step] {stack}: skipped ({why})")
    lora = tbench.config_for(out, "lora", "hf", 1, 1, seed, seq)["lora"]
    head = {"shape": ",".join(shapes), "shapes": list(shapes), "shape_dims": {s: tbench.SHAPES[s] for s in shapes},
            "batch": batch, "seq": seq, "steps": steps, "warmup": warmup, "seed": seed, "lr": LR, "lora": lora,
            "modes": list(modes), "autocast": list(autocasts), "stacks": names, "skipped_stacks": skipped,
            "profile": profile_dir is not None, **({"profile_steps": profile_steps} if profile_dir else {}),
            "cuda_graph": bool(cuda_graph)}
    planned = len(shapes) * len(modes) * len(autocasts) * len(names)
    rows: list[dict] = []
    for shape in shapes:
        checkpoint = tbench.write_checkpoint(shape, out / f"base-{shape}", seed)
        config = json.loads((checkpoint / "config.json").read_text())
        for mode in modes:
            for autocast in autocasts:
                for stack in names:
                    progress(f"[bench step] {shape} {mode} autocast {autocast} {stack}: {warmup} + {steps} steps "
                             f"of {batch} x {seq} tokens")
                    spec = {"checkpoint": str(checkpoint), "vocab_size": config["vocab_size"], "shape": shape,
                            "mode": mode, "autocast": autocast, "stack": stack, "batch": batch, "seq": seq,
                            "steps": steps, "warmup": warmup, "seed": seed, "lr": LR, "profile_steps": profile_steps,
                            "cuda_graph": bool(cuda_graph)}
                    row = measure(spec, config, out, profile_dir, lora["r"])
                    progress(f"[bench step]   failed: {row['error']}" if "error" in row else
                             f"[bench step]   {row['step_s']:.4f} s/step, loss {row['losses'][0]:.4f} -> "
                             f"{row['losses'][-1]:.4f}")
                    rows.append(row)
                    if partial is not None and len(rows) < planned:
                        partial(_result(head, rows, {"done": len(rows), "planned": planned}))
    return _result(head, rows)


def _result(head: dict, rows: list[dict], incomplete: dict | None = None) -> dict:
    result = {**head, "rows": list(rows), "comparisons": compare(rows)}
    if incomplete:
        result["incomplete"] = incomplete
    return result


def measure(spec: dict, config: dict, out: Path, profile_dir: Path | None, lora_r: int) -> dict:
    """One record (``spec``: what :func:`child` reads): the measuring process's result, or its
    error, and the MFU."""
    from workbench import atomic
    from workbench.bench.child import last_line, run_child

    name = f"{spec['shape']}-{spec['mode']}-autocast-{spec['autocast']}-{spec['stack']}"
    result_path = out / f"{name}.result.json"
    result_path.unlink(missing_ok=True)  # from an earlier run of the suite
    spec = {**spec, "result": str(result_path),
            "profile_to": str(profile_dir / name) if profile_dir is not None else None}
    spec_path = atomic.write_json(out / f"{name}.spec.json", spec)
    t0 = time.perf_counter()
    proc = run_child([sys.executable, "-m", "workbench.bench.step", str(spec_path)],
                     env=tbench.stack_env(spec["stack"]))
    atomic.write_text(out / f"{name}.log", proc.stdout + proc.stderr)
    row = {**{k: spec[k] for k in ("shape", "mode", "autocast", "stack")}, "label": STACKS[spec["stack"]].label,
           "exit_code": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
    if proc.returncode != 0 or not result_path.is_file():
        row["error"] = last_line(proc.stderr)
        return row
    row.update(json.loads(result_path.read_text()))
    row["flops_per_step"] = flops_per_step(config, spec["batch"], spec["seq"], lora_r)["total"]
    row["mfu"] = mfu(row["flops_per_step"], row["step_s"], row.get("device_bf16_flops"))
    if row.get("profile") and profile_dir is not None:  # paths relative to the report's folder
        for key in ("csv", "trace"):
            row["profile"][key] = f"{profile_dir.name}/{row['profile'][key]}"
    return row


def compare(rows: list[dict]) -> list[dict]:
    """Every stack against hf of the same shape, mode and autocast: the loss agreement
    (bench/train.loss_agreement, LOSS_BAND), whether both fed the same batch, and the ratios."""
    key = ("shape", "mode", "autocast")
    hf = {tuple(r[k] for k in key): r for r in rows if r["stack"] == "hf" and r.get("losses")}
    out = []
    for r in rows:
        base = hf.get(tuple(r[k] for k in key))
        if r["stack"] == "hf" or base is None or not r.get("losses"):
            continue
        out.append({**{k: r[k] for k in (*key, "stack")},
                    **tbench.loss_agreement(list(enumerate(base["losses"], 1)), list(enumerate(r["losses"], 1))),
                    "same_data": base.get("batch_fingerprint") == r.get("batch_fingerprint"),
                    "speedup": base["step_s"] / r["step_s"] if r.get("step_s") else None,
                    "memory_ratio": _over(r, base, "peak_alloc_gib"),
                    "reserved_ratio": _over(r, base, "peak_reserved_gib")})
    return out


def _over(a: dict, b: dict, key: str) -> float | None:
    return a[key] / b[key] if a.get(key) and b.get(key) else None


# --------------------------------------------------------------------------- the measuring process
def child(spec_path: str) -> int:
    """Build one stack, run the loop, write the result JSON the spec names."""
    spec = json.loads(Path(spec_path).read_text())
    from workbench.offline import enforce_offline

    enforce_offline()
    stack = STACKS[spec["stack"]]
    stack.prepare()  # Unsloth: imported before transformers

    import torch

    from workbench import atomic
    from workbench.data import batch_fingerprint
    from workbench.envinfo import device_name, versions
    from workbench.models import dtype as model_dtype

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = model_dtype("auto")  # the product's: bf16 on a CUDA device, fp32 on the CPU
    model, info = stack.build(Path(spec["checkpoint"]), spec["mode"], spec["seq"], spec["seed"])
    autocast = spec["autocast"] == "on"
    if not autocast:
        stack.frozen_weights_in(model, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    graph = bool(spec.get("cuda_graph")) and cuda
    # A captured optimizer step must keep its state on the device (capturable=True); the
    # update is the same AdamW.
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0, capturable=graph)
    ids = torch.randint(0, spec["vocab_size"], (spec["batch"], spec["seq"]),
                        generator=torch.Generator().manual_seed(spec["seed"])).to(device)

    def forward_backward_update():
        # Autocast's cast cache would hold casts made during capture outside the graph's pool.
        with (torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not graph) if autocast
              else contextlib.nullcontext()):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return loss

    def step():
        loss = forward_backward_update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # With a graph, the warm-up runs on a side stream (capture's documented warm-up: lazy
    # initialisations happen before it), then one capture; the capture itself runs nothing, so
    # every stack takes the same optimizer steps as without a graph.
    side = torch.cuda.Stream() if graph else None
    offload = getattr(model, "activation_offload", None)
    calls = _kernel_calls()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, issued, losses = [], [], []
    for i in range(spec["warmup"] + spec["steps"]):
        if graph and i == spec["warmup"]:
            step = _captured(forward_backward_update, optimizer, side)
        sync()  # each step alone between synchronisations: its own launches and its own kernels
        t0 = time.perf_counter()
        if graph and i < spec["warmup"]:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = step()
            torch.cuda.current_stream().wait_stream(side)
        else:
            loss = step()
        # Issued, not finished: far below the step time the GPU is the bound; near it the host
        # may be (or a full launch queue made it wait; the profile's idle share tells which).
        issued.append(time.perf_counter() - t0)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        if offload is not None and offload.first_step is None:  # as the train stage records it
            if not offload.tensors:
                raise RuntimeError("offloaded checkpointing moved nothing to host memory in the first step.")
            offload.first_step = {"tensors": offload.tensors, "gib": round(offload.bytes / 2**30, 4)}
    timed = times[spec["warmup"]:]
    step_s = statistics.median(timed)
    frozen = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                     if not p.requires_grad and p.is_floating_point()})
    result = {
        "step_s": step_s, "step_times_s": [round(t, 6) for t in times], "timed_from_step": spec["warmup"] + 1,
        "host_issue_s": statistics.median(issued[spec["warmup"]:]),
        "tokens_per_s": spec["batch"] * spec["seq"] / step_s,
        "losses": losses, "final_loss": losses[-1],
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
        "batch_fingerprint": batch_fingerprint({"input_ids": ids, "labels": ids}),
        "device": device_name(), "model_dtype": str(dtype).removeprefix("torch."), "frozen_float_dtypes": frozen,
        "adapter_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params}),
        "trainable_params": sum(p.numel() for p in params), **info,
        "kernel_calls": {k: n - calls.get(k, 0) for k, n in sorted(_kernel_calls().items()) if n > calls.get(k, 0)}
        or None,
        "versions": versions("torch", "triton", "transformers", "peft", "bitsandbytes", "liger-kernel", "unsloth"),
    }
    if offload is not None:
        from workbench.offload import record

        result["offload"] = record(offload)
    if spec.get("profile_to"):
        result["profile"] = profile_steps(step, spec["profile_steps"], sync, cuda, Path(spec["profile_to"]))
    result["device_bf16_flops"] = matmul_rate() if cuda else None
    atomic.write_json(spec["result"], result)
    return 0


def _captured(forward_backward_update: Callable, optimizer, side) -> Callable:
    """The step as one CUDA graph (PyTorch's whole-network capture): gradients set to None
    before the capture are allocated in the graph's pool by its backward, and every replay
    writes them afresh, so no zero_grad runs between replays. Returns the replaying step."""
    import torch

    if side is not None:
        torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = forward_backward_update()

    def replay():
        graph.replay()
        return static_loss.detach().clone()

    return replay


def _kernel_calls() -> dict[str, int]:
    patch = sys.modules.get("workbench.patch")  # imported only by a stack that patches
    return patch.kernel_calls() if patch is not None else {}


def matmul_rate(n: int = GEMM_N, reps: int = GEMM_REPS) -> float:
    """FLOP/s of a bf16 n x n x n matmul on the current CUDA device, timed with CUDA events."""
    import torch

    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    for _ in range(3):
        torch.mm(a, b, out=c)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        torch.mm(a, b, out=c)
    end.record()
    end.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3)


def profile_steps(step: Callable, n: int, sync: Callable, cuda: bool, dest: Path) -> dict:
    """``n`` steps under torch.profiler: per kernel (CUDA) or op (CPU, by self time) its time
    and calls per step and its share of the whole, written to ``<dest>.csv`` with the Chrome
    trace as ``<dest>.trace.json`` (gzipped when large); the busy share is the union of the
    kernels' (ops') intervals over the steps' wall time, so overlapping streams count once."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from workbench import atomic

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        wall_us = (time.perf_counter() - t0) * 1e6
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    spans = []
    for e in prof.events():
        if e.device_type != kind:
            continue
        spans.append((e.time_range.start, e.time_range.end))
        totals[e.name] = totals.get(e.name, 0.0) + (e.time_range.elapsed_us() if cuda else e.self_cpu_time_total)
        counts[e.name] = counts.get(e.name, 0) + 1
    busy_us = union_length(spans)
    whole = sum(totals.values()) or 1.0
    rows = sorted(({"name": k, "ms_per_step": totals[k] / n / 1e3, "share": totals[k] / whole,
                    "calls_per_step": counts[k] / n} for k in totals), key=lambda r: -r["ms_per_step"])
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")  # kernel names hold commas (template arguments)
    writer.writerow(["name", "ms_per_step", "share", "calls_per_step"])
    writer.writerows([r["name"], f"{r['ms_per_step']:.6f}", f"{r['share']:.6f}", f"{r['calls_per_step']:g}"]
                     for r in rows)
    dest.parent.mkdir(parents=True, exist_ok=True)
    csv_path = atomic.write_text(dest.parent / f"{dest.name}.csv", table.getvalue())
    trace = write_trace(prof, dest)
    return {"steps": n, "measure": "CUDA kernels (and copies), device time" if cuda else "CPU ops, self time",
            "wall_ms_per_step": wall_us / n / 1e3, "busy_ms_per_step": busy_us / n / 1e3,
            "idle_share": max(0.0, 1.0 - busy_us / wall_us) if wall_us else None,
            "csv": csv_path.name, "trace": trace.name, "top": rows[:TOP]}


def write_trace(prof, dest: Path) -> Path:
    """The profiler's Chrome trace as ``<dest>.trace.json``, gzipped (``.gz``) when large."""
    import gzip

    from workbench import atomic

    dest.parent.mkdir(parents=True, exist_ok=True)
    trace = dest.parent / f"{dest.name}.trace.json"
    with atomic.file(trace) as tmp:
        prof.export_chrome_trace(str(tmp))
    if trace.stat().st_size > GZIP_ABOVE:
        gz = atomic.write_bytes(trace.with_name(trace.name + ".gz"), gzip.compress(trace.read_bytes()))
        trace.unlink()
        trace = gz
    return trace


def union_length(spans: list[tuple[float, float]]) -> float:
    """The length of the union of intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


# --------------------------------------------------------------------------- the report
def _groups(result: dict) -> list[tuple[str, str, str]]:
    return list(dict.fromkeys((r["shape"], r["mode"], r["autocast"]) for r in result["rows"]))


def markdown(result: dict, env: dict, command: str, png_name: str) -> str:
    def f(v, spec=".3f"):
        return "—" if v is None else format(v, spec)

    lora = result["lora"]
    dtypes = sorted({r["model_dtype"] for r in result["rows"] if r.get("model_dtype")})
    lines = [
        f"# Plain-loop training step — {env['device']} — {env['date']}", "",
        *tbench.incomplete_line(result, "records"),
        f"- **Command:** `{command}`",
        f"- **Loop:** `model(input_ids=ids, labels=ids)` → `loss.backward()` → `AdamW.step()` (the trainable "
        f"parameters, lr {result['lr']:g}, weight decay 0, no clipping) → `zero_grad(set_to_none=True)`; one batch "
        f"of {result['batch']} x {result['seq']} random tokens (seed {result['seed']}), the same in every process (the "
        "`same data` column compares their fingerprints); no TRL, no dataloader; `use_cache` off. Each (stack, "
        "mode, autocast) runs in its own process from the same random-weight checkpoint.",
        "- **Models:** " + "; ".join(f"`{s}` {result['shape_dims'][s]}" for s in result["shapes"])
        + f" (vocab raised to the tokenizer's when smaller). LoRA r{lora['r']} alpha {lora['alpha']:g} dropout "
        f"{lora['dropout']:g} on all seven projections (q, k, v, o, gate, up, down); QLoRA: bitsandbytes NF4, "
        "double quant, compute dtype bf16 (the model's).",
        "- **Autocast:** `on` wraps the forward and the loss in `torch.autocast(\"cuda\", dtype=torch.bfloat16)` "
        "with the model as the product loads it for the Trainer with bf16=True (bf16 weights; QLoRA: "
        "prepare_model_for_kbit_training's fp32 norms, embeddings and head). `off`: no autocast, the frozen float "
        "weights in bf16 (QLoRA's fp32 upcast undone; Unsloth as it loads), the adapters as PEFT leaves them "
        f"(fp32). Model dtype here: {', '.join(dtypes) or '—'} (the product's: bf16 on CUDA; on the CPU fp32, "
        "with `torch.autocast(\"cpu\")`); each record's dtypes are in the JSON (`frozen_float_dtypes`, "
        "`adapter_dtypes`).",
        f"- **Timing:** the median of {result['steps']} timed step(s) after {result['warmup']} warm-up step(s), each "
        "step between two `torch.cuda.synchronize()` on `time.perf_counter` (its launches included); tokens/s = "
        "batch x seq / step time. Host issue s: the median time from a step's start until `step()` returns, "
        "before the closing synchronize. Well below the step time, the GPU is the bound; near it, either the host "
        "is (launch overhead is what to cut) or the launch queue filled and the host waited for the GPU, which "
        "the profile's idle share tells apart. Memory: peak allocated (`max_memory_allocated`) and reserved "
        "(`max_memory_reserved`) over the warm-up and timed steps, counted from after the model was built.",
        *(["- **CUDA graph (`--cuda-graph`):** the warm-up steps ran eagerly on a side stream; then the whole step "
           "(forward, backward, `AdamW(capturable=True).step()`, autocast's cast cache off) was captured once as "
           "one CUDA graph, and every timed step is a replay: no host launch overhead. This is a probe of what "
           "launches cost each stack, not how the product trains (TRL's loop runs eagerly). A stack whose step "
           "cannot be captured fails with the reason in its row."] if result.get("cuda_graph") else []),
        f"- **Loss:** every step's loss against hf's of the same shape, mode and autocast; a stack whose loss "
        f"differs by more than {tbench.LOSS_BAND:g} relative at any step is flagged, whatever its speed. At step 1 "
        f"the weights are the same in every stack, so a step-1 difference above {tbench.FIRST_STEP_BAND:.2g} "
        "(bf16's unit roundoff) is not rounding.",
        "- **Stacks:** " + "; ".join(f"`{s}` {STACKS[s].label}" for s in result["stacks"]) + ".",
        *(["- **Not run:** " + "; ".join(f"`{k}` ({v})" for k, v in result["skipped_stacks"].items()) + "."]
          if result.get("skipped_stacks") else []),
        f"- **Versions:** torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, transformers "
        f"{env['transformers']}, peft {env['peft']}, bitsandbytes {env.get('bitsandbytes')}, liger-kernel "
        f"{env.get('liger_kernel')} (each record's own in the JSON: Unsloth's process has its own site)",
        "", FLOPS_TEXT.format(n=GEMM_N, reps=GEMM_REPS), "",
    ]
    comparisons = {(c["shape"], c["mode"], c["autocast"], c["stack"]): c for c in result["comparisons"]}
    for group in _groups(result):
        shape, mode, autocast = group
        rows = [r for r in result["rows"] if (r["shape"], r["mode"], r["autocast"]) == group]
        rates = [r["device_bf16_flops"] / 1e12 for r in rows if r.get("device_bf16_flops")]
        lines += [f"## {shape} · {mode.upper()} · autocast {autocast}", "",
                  *([f"Measured bf16 matmul rate R: {min(rates):.0f} to {max(rates):.0f} TFLOP/s across these "
                     "processes (each record's MFU uses its own).", ""] if rates else []),
                  ]
        cells = []
        for r in rows:
            if "error" in r:
                cells.append([r["stack"], f"failed (exit {r['exit_code']}): {r['error'].replace('|', '/')}",
                              *[""] * 10])
                continue
            c = comparisons.get((*group, r["stack"]))
            speed = "1" if r["stack"] == "hf" else f(c and c["speedup"], ".2f")
            verdict = "baseline" if r["stack"] == "hf" else (tbench.verdict(c) if c else "— (no hf record)")
            same = "—" if not c else {True: "yes", False: "**no**"}[c["same_data"]]
            mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") else "—"
            cells.append([r["stack"], f(r["step_s"], ".4f"), speed, f(r.get("host_issue_s"), ".4f"),
                          f(r["tokens_per_s"], ".0f"), mfu,
                          f(r.get("peak_alloc_gib"), ".2f"), f(r.get("peak_reserved_gib"), ".2f"),
                          f(c and c["first_rel_loss_diff"], ".2e"), f(c and c["max_rel_loss_diff"], ".2e"), same,
                          verdict])
        lines += table(["stack", "s/step", "speed × hf", "host issue s", "tokens/s", "MFU", "peak alloc. GiB",
                        "peak reserved GiB", "step-1 rel. loss diff", "max rel. loss diff", "same data", "loss"], cells,
                       align="lrrrrrrrrrll")
        lines += ["", *_profile_section(rows), ""]
    lines += [f"![speed and memory against hf]({png_name})", ""]
    return "\n".join(lines)


def _profile_section(rows: list[dict]) -> list[str]:
    """Ours and the fastest peer's top kernels side by side (ours-gc/-offload when plain ours
    did not run; the peers are every stack that is not ours)."""
    done = [r for r in rows if r.get("profile")]
    ours = next((r for r in done if r["stack"] == "ours"), None) or next(
        (r for r in sorted(done, key=lambda r: r["step_s"]) if r["stack"].startswith("ours")), None)
    peers = sorted((r for r in done if not r["stack"].startswith("ours")), key=lambda r: r["step_s"])
    if ours is None and not peers:
        return []
    shown = [r for r in (ours, peers[0] if peers else None) if r is not None]
    names = " vs ".join("`" + r["stack"] + "`" for r in shown)
    first = shown[0]["profile"]
    lines = [f"### Profile: {names} ({first['steps']} steps after the timed ones; {first['measure']})", ""]
    for r in shown:
        p = r["profile"]
        idle = "—" if p["idle_share"] is None else f"{100 * p['idle_share']:.1f} %"
        lines.append(f"- `{r['stack']}`: {p['wall_ms_per_step']:.2f} ms a profiled step, busy "
                     f"{p['busy_ms_per_step']:.2f} ms, idle {idle}; every entry in [{p['csv']}]({p['csv']}), "
                     f"the trace in [{p['trace']}]({p['trace']})")
    lines += ["", "The profiler's own overhead lengthens a profiled step (compare it with the timed s/step above), so "
              "the idle share is an upper bound.",
              ""]
    rows = []
    for i in range(max(len(r["profile"]["top"]) for r in shown)):
        cells = [str(i + 1)]
        for r in shown:
            top = r["profile"]["top"]
            if i < len(top):
                k = top[i]
                name = k["name"] if len(k["name"]) <= 70 else k["name"][:67] + "..."
                cells += [f"`{name.replace('|', '/').replace('`', '')}`", f"{k['ms_per_step']:.3f}",
                          f"{100 * k['share']:.1f} %", f"{k['calls_per_step']:g}"]
            else:
                cells += [""] * 4
        rows.append(cells)
    head = [f"{h}" for r in shown for h in (f"{r['stack']}: name", "ms/step", "share", "calls/step")]
    return lines + table(["#", *head], rows, align="r" + "lrrr" * len(shown))


def plot(result: dict, path: Path) -> Path:
    """Per (shape, mode, autocast): each stack's speed (hf's step time / its own) and peak
    allocated memory (its / hf's), failed records marked where their bar would be."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(result)
    stacks = [s for s in dict.fromkeys(r["stack"] for r in result["rows"])]
    by = {(r["shape"], r["mode"], r["autocast"], r["stack"]): r for r in result["rows"]}
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 3 * len(groups) + 4), 5))
    width = 0.8 / max(len(stacks), 1)
    for ax, (metric, title) in zip(axes, (("step_s", "speed × hf (hf s/step ÷ the stack's; higher is faster)"),
                                          ("peak_alloc_gib", "peak allocated ÷ hf's (lower is leaner)"))):
        top = 1.0
        for g, group in enumerate(groups):
            hf = (by.get((*group, "hf")) or {}).get(metric)
            for s, stack in enumerate(stacks):
                r = by.get((*group, stack))
                if r is None:
                    continue
                x, value = g + (s - (len(stacks) - 1) / 2) * width, r.get(metric)
                if "error" in r or not value or not hf:
                    ax.text(x, 0.02, "failed" if "error" in r else "n/a", transform=ax.get_xaxis_transform(),
                            rotation=90, ha="center", va="bottom", fontsize=7, color="tab:red")
                    continue
                ratio = hf / value if metric == "step_s" else value / hf
                top = max(top, ratio)
                ax.bar(x, ratio, width, color=f"C{s}", label=stack if g == 0 else None)
                ax.text(x, ratio, f"{ratio:.2f}", ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlim(-0.5, len(groups) - 0.5)
        ax.set_ylim(0, top * 1.15)
        ax.set_xticks(range(len(groups)), [f"{s}\n{m} · autocast {a}" for s, m, a in groups], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(child(sys.argv[1]))
