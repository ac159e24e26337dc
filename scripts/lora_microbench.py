"""Micro-benchmark of the LoRA kernels: one forward + backward of a LoRA linear, of the
q/k/v group and of the gated MLP, at Llama-3.2-1B's shapes, against PEFT on nn.Linear.

    PYTHONPATH=src python scripts/lora_microbench.py OUT.json [--previous main]
    TRITON_INTERPRET=1 PYTHONPATH=src python scripts/lora_microbench.py OUT.json --cpu-smoke

Rows (each case, same tensors for every row):

* ``peft``: PEFT's LoRA layers on nn.Linear (``peft.inject_adapter_in_model``), in the
  layer's dtype (no autocast: the kernels' math, without autocast's casts of A and B);
* ``previous``: the workbench kernels of another revision (``--previous``: a git revision
  of this repository, or a directory holding a ``kernels`` package), for the effect of a
  change; skipped, with the reason in the JSON, when that revision cannot be loaded;
* ``ours``: the kernels of this checkout.

Each row is timed with CUDA events around every iteration after a warm-up (Triton's
compilation happens there) and reported as the median, with min and max; every row's
outputs and gradients are checked against PEFT's first (the largest relative difference
is in the JSON), so a broken path is not timed as a fast one. Gradients: x (as inside a
model), every A and B; the frozen weights get none. ``--cpu-smoke`` runs tiny shapes on
the CPU under Triton's interpreter (wall-clock timings, meaningless as speed): it checks
that the script and every row run.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

#: Llama-3.2-1B: hidden 2048, 32 query heads and 8 key/value heads of 64, intermediate 8192;
#: r = 16 on every projection, 4 x 2048 tokens (the step profile's shape).
SHAPES = {"tokens": 8192, "hidden": 2048, "q_out": 32 * 64, "kv_out": 8 * 64, "inter": 8192, "r": 16,
          "alpha": 32.0}
SMOKE_SHAPES = {"tokens": 24, "hidden": 32, "q_out": 4 * 8, "kv_out": 2 * 8, "inter": 48, "r": 4, "alpha": 8.0}
PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CASES = ("linear", "qkv", "mlp")


class Block(nn.Module):
    """The seven LoRA targets of one Llama decoder layer, nothing else."""

    def __init__(self, s: dict):
        super().__init__()
        h, q, kv, i = s["hidden"], s["q_out"], s["kv_out"], s["inter"]
        for name, (d_in, d_out) in zip(PROJS, ((h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h))):
            setattr(self, name, nn.Linear(d_in, d_out, bias=False))


def build(s: dict, dtype: torch.dtype, device: torch.device) -> nn.Module:
    import peft

    torch.manual_seed(0)
    block = Block(s)
    config = peft.LoraConfig(r=s["r"], lora_alpha=s["alpha"], lora_dropout=0.0, target_modules=list(PROJS))
    block = peft.inject_adapter_in_model(config, block).to(device=device, dtype=dtype)
    with torch.no_grad():
        for name in PROJS:
            layer = getattr(block, name)
            layer.base_layer.weight.requires_grad_(False)
            # B random, not PEFT's zero init: a trained adapter, and every term of the math is live.
            layer.lora_B["default"].weight.normal_(0.0, 0.02)
    return block


def operands(layer) -> tuple:
    return layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight


def scaling(layer) -> float:
    return float(layer.scaling["default"])


# --------------------------------------------------------------------------- rows
def peft_fns(block):
    def linear(x):
        return (block.o_proj(x),)

    def qkv(x):
        return block.q_proj(x), block.k_proj(x), block.v_proj(x)

    def mlp(x):
        return (block.down_proj(F.silu(block.gate_proj(x)) * block.up_proj(x)),)

    return {"linear": linear, "qkv": qkv, "mlp": mlp}


def kernel_fns(block, kernels: str):
    """The three cases through the kernels of package ``kernels`` (``workbench.kernels``
    or another revision's copy)."""
    lora_o = importlib.import_module(f"{kernels}.lora_o").lora_o
    lora_qkv = importlib.import_module(f"{kernels}.lora_qkv").lora_qkv
    lora_mlp = importlib.import_module(f"{kernels}.lora_mlp").lora_mlp
    s = scaling(block.o_proj)

    def linear(x):
        return (lora_o(x, *operands(block.o_proj), s),)

    def qkv(x):
        return lora_qkv(x, *operands(block.q_proj), *operands(block.k_proj), *operands(block.v_proj), s)

    def mlp(x):
        return (lora_mlp(x, *operands(block.gate_proj), *operands(block.up_proj), *operands(block.down_proj), s,
                         activation="swiglu"),)

    return {"linear": linear, "qkv": qkv, "mlp": mlp}


def previous_kernels(where: str) -> str:
    """Import another revision's kernels as the package ``workbench_previous.kernels`` and
    return that name. ``where``: a directory holding ``kernels/`` (or the kernels package
    itself), else a git revision of this repository. Raises RuntimeError when neither works."""
    root = Path(tempfile.mkdtemp(prefix="lora-microbench-"))
    pkg = root / "workbench_previous"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    src = Path(where)
    if src.is_dir():
        src = src / "kernels" if (src / "kernels" / "__init__.py").exists() else src
        if not (src / "__init__.py").exists():
            raise RuntimeError(f"{where} holds no kernels package (no __init__.py)")
        (pkg / "kernels").symlink_to(src.resolve(), target_is_directory=True)
    else:
        repo = Path(__file__).resolve().parent.parent
        path = "src/workbench/kernels"
        try:
            archive = subprocess.run(["git", "-C", str(repo), "archive", where, path], check=True,
                                     capture_output=True).stdout
        except (OSError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", b"") or b""
            raise RuntimeError(f"git archive {where} failed: {detail.decode(errors='replace').strip() or err}")
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
        (root / path).rename(pkg / "kernels")
    sys.path.insert(0, str(root))
    return "workbench_previous.kernels"


# --------------------------------------------------------------------------- timing
def leaves(block, case: str) -> list[torch.Tensor]:
    names = {"linear": ("o_proj",), "qkv": ("q_proj", "k_proj", "v_proj"),
             "mlp": ("gate_proj", "up_proj", "down_proj")}[case]
    return [t for n in names for t in operands(getattr(block, n))[1:]]


def step(fn, x, dys, params):
    x.grad = None
    for p in params:
        p.grad = None
    outs = fn(x)
    torch.autograd.backward(outs, dys)
    return outs


def snapshot(fn, x, dys, params):
    outs = step(fn, x, dys, params)
    return [t.detach().float().clone() for t in (*outs, x.grad, *(p.grad for p in params))]


def max_rel_diff(got: list, want: list) -> float:
    return max(((g - w).norm() / w.norm().clamp_min(1e-30)).item() for g, w in zip(got, want))


def time_row(fn, x, dys, params, warmup: int, iters: int, cuda: bool) -> list[float]:
    for _ in range(warmup):
        step(fn, x, dys, params)
    times = []
    if cuda:
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            step(fn, x, dys, params)
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            step(fn, x, dys, params)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument("--previous", default="main",
                    help="git revision (or a directory holding a kernels package) for the 'previous' row; "
                         "'none' skips it (default: main)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per row (default 20; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 5; smoke 1)")
    ap.add_argument("--tokens", type=int, default=None, help="rows of x (default 8192)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    args = ap.parse_args(argv)

    smoke = args.cpu_smoke
    cuda = not smoke
    if cuda and not torch.cuda.is_available():
        print("lora_microbench: no CUDA device; run with --cpu-smoke (tiny shapes under TRITON_INTERPRET=1) "
              "to check the script on a CPU.", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    shapes = dict(SMOKE_SHAPES if smoke else SHAPES)
    if args.tokens:
        shapes["tokens"] = args.tokens
    iters = args.iters or (2 if smoke else 20)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 5)

    block = build(shapes, dtype, device)
    rows = {"peft": peft_fns(block), "ours": kernel_fns(block, "workbench.kernels")}
    skipped = {}
    if args.previous != "none":
        try:
            rows["previous"] = kernel_fns(block, previous_kernels(args.previous))
        except Exception as err:  # noqa: BLE001 -- any failure to load it only skips the row
            skipped["previous"] = f"{args.previous}: {type(err).__name__}: {err}"
            print(f"skipping 'previous': {skipped['previous']}", file=sys.stderr)
    order = [r for r in ("peft", "previous", "ours") if r in rows]

    gen = torch.Generator(device="cpu").manual_seed(1)
    results = []
    for case in CASES:
        d_in = shapes["q_out"] if case == "linear" else shapes["hidden"]
        x = torch.randn((shapes["tokens"], d_in), generator=gen).to(device, dtype).requires_grad_(True)
        with torch.no_grad():
            out_shapes = [o.shape for o in rows["peft"][case](x)]
        dys = [torch.randn(shp, generator=gen).to(device, dtype) for shp in out_shapes]
        params = leaves(block, case)
        want = snapshot(rows["peft"][case], x, dys, params)
        for row in order:
            fn = rows[row][case]
            diff = max_rel_diff(snapshot(fn, x, dys, params), want)
            ms = time_row(fn, x, dys, params, warmup, iters, cuda)
            results.append({"case": case, "row": row, "median_ms": statistics.median(ms), "min_ms": min(ms),
                            "max_ms": max(ms), "iters": iters, "max_rel_diff_vs_peft": diff})
        del x, dys

    by = {(r["case"], r["row"]): r for r in results}
    for r in results:
        base = by[(r["case"], "peft")]["median_ms"]
        r["speedup_vs_peft"] = base / r["median_ms"] if r["median_ms"] else None
        prev = by.get((r["case"], "previous"))
        r["speedup_vs_previous"] = prev["median_ms"] / r["median_ms"] if prev and r["median_ms"] else None

    import peft
    import triton
    record = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or 'interpreter'})",
        "smoke": smoke, "dtype": str(dtype).removeprefix("torch."), "shapes": shapes, "warmup": warmup,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "peft": peft.__version__,
                     "python": platform.python_version()},
        "previous": None if args.previous == "none" else args.previous, "skipped": skipped,
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "results": results,
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")

    print(f"{record['device']} · {record['dtype']} · tokens {shapes['tokens']}, hidden {shapes['hidden']}, "
          f"q {shapes['q_out']}, kv {shapes['kv_out']}, inter {shapes['inter']}, r {shapes['r']} · "
          f"median of {iters} after {warmup} warm-up" + (" · SMOKE: timings meaningless" if smoke else ""))
    print(f"{'case':<8} {'row':<9} {'median ms':>10} {'min ms':>9} {'x peft':>7} {'x prev':>7} {'rel diff':>9}")
    for r in results:
        sp = f"{r['speedup_vs_peft']:.2f}" if r["speedup_vs_peft"] else "-"
        sv = f"{r['speedup_vs_previous']:.2f}" if r["speedup_vs_previous"] else "-"
        print(f"{r['case']:<8} {r['row']:<9} {r['median_ms']:>10.3f} {r['min_ms']:>9.3f} {sp:>7} {sv:>7} "
              f"{r['max_rel_diff_vs_peft']:>9.2e}")
    for row, why in skipped.items():
        print(f"(skipped {row}: {why})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
