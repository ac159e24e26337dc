"""Kernel micro-benchmarks: every registered kernel against its PyTorch reference
(eager, as HF runs it in the dtype), ``torch.compile`` of that reference, and
Liger-Kernel's equivalent where it is installed — all in the same process.

Measured per stack: forward ms, forward+backward ms (median of triton's
``do_bench`` on CUDA; wall-clock medians on the CPU, for smoke tests only) and
the peak extra memory of one forward+backward. Shapes come from real models
(Llama-3.1-8B by default). Nothing here asserts a speed: numbers go to reports.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from workbench.kernels import registry

Builder = Callable[[torch.device, torch.dtype], "Case"]


@dataclass
class Case:
    kernel: str
    shape: str
    tensors: dict[str, Any]
    options: dict[str, Any]
    grads: tuple[str, ...]
    bytes_moved: int = 0                  # minimal HBM traffic of forward + backward (for the floor)
    flops: int = 0                        # matmul FLOPs of forward + backward (for the floor)
    liger: Callable[..., Any] | None = None  # builds Liger's callable on these tensors, if any


def _randn(shape, device, dtype, scale=1.0, grad=False):
    t = (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype)
    return t.requires_grad_(grad)


# --------------------------------------------------------------------------- shapes
# Llama-3.1-8B: hidden 4096, intermediate 14336, 32 q heads / 8 kv heads of 128,
# vocab 128256, 8192 tokens (batch 4 x 2048). "tiny" keeps the CPU smoke test fast.
SHAPES = {
    "llama3-8b": dict(tokens=8192, batch=4, hidden=4096, inter=14336, heads=32, kv=8, head_dim=128,
                      vocab=128256, rank=16),
    "llama3.2-1b": dict(tokens=8192, batch=4, hidden=2048, inter=8192, heads=32, kv=8, head_dim=64,
                        vocab=128256, rank=16),
    "tiny": dict(tokens=8, batch=2, hidden=32, inter=48, heads=2, kv=1, head_dim=8, vocab=64, rank=4),
}


def _liger(module: str, attr: str):
    try:
        mod = __import__(module, fromlist=[attr])
        return getattr(mod, attr)
    except Exception:  # not installed, or an API this version lacks
        return None


def cases(shape_name: str, device: torch.device, dtype: torch.dtype) -> list[Case]:
    s = SHAPES[shape_name]
    n, h, inter, v = s["tokens"], s["hidden"], s["inter"], s["vocab"]
    el = torch.tensor([], dtype=dtype).element_size()
    out: list[Case] = []

    x, w = _randn((n, h), device, dtype, grad=True), _randn((h,), device, dtype, 0.1, grad=True)
    with torch.no_grad():
        w += 1
    rms_cls = _liger("liger_kernel.transformers", "LigerRMSNorm")

    def liger_rms(x=x, w=w):
        mod = rms_cls(h, eps=1e-6).to(device=device, dtype=dtype)
        mod.weight = torch.nn.Parameter(w.detach().clone())
        return lambda: mod(x)
    out.append(Case("rms_norm", f"{n}x{h}", {"x": x, "weight": w}, {"eps": 1e-6}, ("x", "weight"),
                    bytes_moved=5 * n * h * el, liger=liger_rms if rms_cls else None))

    b = _randn((h,), device, dtype, 0.1, grad=True)
    out.append(Case("layer_norm", f"{n}x{h}", {"x": x, "weight": w, "bias": b}, {"eps": 1e-5},
                    ("x", "weight", "bias"), bytes_moved=5 * n * h * el))

    bsz, seq, hq, hk, d = s["batch"], n // s["batch"], s["heads"], s["kv"], s["head_dim"]
    q = _randn((bsz, seq, hq, d), device, dtype).transpose(1, 2).requires_grad_(True)
    k = _randn((bsz, seq, hk, d), device, dtype).transpose(1, 2).requires_grad_(True)
    pos = torch.arange(seq, device=device, dtype=torch.float32)
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    freqs = torch.outer(pos, inv)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos()[None].to(dtype), emb.sin()[None].to(dtype)
    rope_fn = _liger("liger_kernel.transformers", "liger_rotary_pos_emb")
    out.append(Case("rope", f"B{bsz} S{seq} Hq{hq} Hk{hk} D{d}", {"q": q, "k": k, "cos": cos, "sin": sin}, {},
                    ("q", "k"), bytes_moved=4 * bsz * seq * (hq + hk) * d * el,
                    liger=(lambda: (lambda: rope_fn(q, k, cos, sin))) if rope_fn else None))

    g, u = _randn((n, inter), device, dtype, grad=True), _randn((n, inter), device, dtype, grad=True)
    swi = _liger("liger_kernel.ops.swiglu", "LigerSiLUMulFunction")
    out.append(Case("swiglu", f"{n}x{inter}", {"gate": g, "up": u}, {}, ("gate", "up"),
                    bytes_moved=7 * n * inter * el,
                    liger=(lambda: (lambda: swi.apply(g, u))) if swi else None))
    gel = _liger("liger_kernel.ops.geglu", "LigerGELUMulFunction")
    out.append(Case("geglu", f"{n}x{inter}", {"gate": g, "up": u}, {"approximate": "tanh"}, ("gate", "up"),
                    bytes_moved=7 * n * inter * el,
                    liger=(lambda: (lambda: gel.apply(g, u))) if gel else None))

    logits = _randn((n, v), device, dtype, 2.0, grad=True)
    target = torch.randint(0, v, (n,), device=device)
    ce_cls = _liger("liger_kernel.transformers", "LigerCrossEntropyLoss")
    out.append(Case("cross_entropy", f"{n}x{v}", {"logits": logits, "target": target}, {}, ("logits",),
                    bytes_moved=3 * n * v * el,
                    liger=(lambda: (lambda m=ce_cls(): m(logits, target))) if ce_cls else None))

    if "fused_linear_cross_entropy" in registry():
        hid = _randn((n, h), device, dtype, grad=True)
        lm = _randn((v, h), device, dtype, h ** -0.5, grad=True)
        flce_cls = _liger("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss")
        out.append(Case("fused_linear_cross_entropy", f"{n}x{h} @ {v}x{h}",
                        {"hidden": hid, "weight": lm, "target": target}, {}, ("hidden", "weight"),
                        bytes_moved=(2 * n * h + 3 * v * h) * el, flops=6 * n * h * v,
                        liger=(lambda: (lambda m=flce_cls(): m(lm, hid, target))) if flce_cls else None))
    return out


# --------------------------------------------------------------------------- timing
def _timer(device: torch.device):
    if device.type == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def wall(fn, reps=3):
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    return wall


def _fwd_bwd(call: Callable[[], Any], leaves: list[torch.Tensor]) -> Callable[[], None]:
    def step():
        for t in leaves:
            t.grad = None
        out = call()
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                if isinstance(o, torch.Tensor) and o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return step


def _peak_extra(step: Callable[[], None], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


@dataclass
class Row:
    kernel: str
    shape: str
    stack: str
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    peak_extra_gib: float | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)


def device_ceilings(device: torch.device) -> dict:
    """Copy bandwidth and bf16 matmul rate, measured once per run (the floors' denominators)."""
    if device.type != "cuda":
        return {}
    import triton.testing

    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
    bw = 2 * a.numel() / (ms * 1e-3)
    m = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms_mm = triton.testing.do_bench(lambda: m @ m, return_mode="median")
    return {"copy_bytes_per_s": bw, "bf16_flops_per_s": 2 * 8192**3 / (ms_mm * 1e-3)}


def run(shape_name: str = "llama3-8b", dtype: torch.dtype = torch.bfloat16, only: list[str] | None = None,
        compile_reference: bool = True, progress: Callable[[str], None] = print) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timer = _timer(device)
    specs = registry()
    ceilings = device_ceilings(device)
    rows: list[Row] = []
    for case in cases(shape_name, device, dtype):
        if only and case.kernel not in only:
            continue
        spec = specs[case.kernel]
        leaves = [case.tensors[g] for g in case.grads]
        stacks: dict[str, Callable[[], Any]] = {
            "ours": lambda spec=spec, c=case: spec.fn(**c.tensors, **c.options),
            "torch": lambda spec=spec, c=case: spec.reference(**c.tensors, **c.options),
        }
        if compile_reference and device.type == "cuda":
            compiled = torch.compile(spec.reference, dynamic=False)
            stacks["torch.compile"] = lambda c=case, f=compiled: f(**c.tensors, **c.options)
        if case.liger is not None:
            try:
                stacks["liger"] = case.liger()
            except Exception as err:  # noqa: BLE001 - recorded in the report
                rows.append(Row(case.kernel, case.shape, "liger", error=f"{type(err).__name__}: {err}"))
        for stack, call in stacks.items():
            progress(f"[bench] {case.kernel} {case.shape} {stack}")
            row = Row(case.kernel, case.shape, stack)
            try:
                with torch.no_grad():
                    row.fwd_ms = timer(call)
                step = _fwd_bwd(call, leaves)
                row.fwd_bwd_ms = timer(step)
                row.peak_extra_gib = _peak_extra(step, device)
            except torch.cuda.OutOfMemoryError as err:
                row.error = f"OOM: {str(err).splitlines()[0]}"
                torch.cuda.empty_cache()
            except Exception as err:  # noqa: BLE001 - recorded in the report, never hidden
                row.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            rows.append(row)
        floor = None
        if ceilings:
            floor = max(case.bytes_moved / ceilings["copy_bytes_per_s"],
                        case.flops / ceilings["bf16_flops_per_s"]) * 1e3
        rows.append(Row(case.kernel, case.shape, "floor", fwd_bwd_ms=floor,
                        extra={"bytes_moved": case.bytes_moved, "flops": case.flops}))
        for t in case.tensors.values():
            if isinstance(t, torch.Tensor):
                t.grad = None
    return {"shape": shape_name, "shape_dims": SHAPES[shape_name], "dtype": str(dtype).removeprefix("torch."),
            "ceilings": ceilings, "rows": [r.__dict__ for r in rows]}


def markdown(result: dict, env: dict, command: str) -> str:
    lines = [
        f"# Kernel micro-benchmarks — {env['device']} — {env['date']}",
        "",
        f"- **Command:** `{command}`",
        f"- **Shapes:** `{result['shape']}` {result['shape_dims']}, dtype {result['dtype']}",
        f"- **Versions:** torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
        f"transformers {env['transformers']}, liger-kernel {env.get('liger_kernel')}",
        "- **Stacks:** `ours` (Triton kernels), `torch` (the PyTorch reference, eager, computing in fp32 as HF "
        "does), `torch.compile` (of that reference), `liger` (Liger-Kernel, when installed), `floor` "
        "(minimal bytes at the measured copy rate, or matmul FLOPs at the measured bf16 rate).",
        "- Times are medians in ms (triton `do_bench`); `vs torch` is the torch time over ours, same run; "
        "peak is the extra memory of one forward+backward.",
        "",
        "| kernel | shape | stack | fwd ms | fwd+bwd ms | vs torch (fwd+bwd) | peak extra GiB | note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    torch_ms = {(r["kernel"], r["stack"]): r["fwd_bwd_ms"] for r in result["rows"]}

    def fmt(v, spec=".3f"):
        return "—" if v is None else format(v, spec)

    for r in result["rows"]:
        base = torch_ms.get((r["kernel"], "torch"))
        ratio = (f"{base / r['fwd_bwd_ms']:.2f}x" if base and r["fwd_bwd_ms"] and r["stack"] != "floor" else "")
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['stack']} | {fmt(r['fwd_ms'])} | {fmt(r['fwd_bwd_ms'])} "
                     f"| {ratio} | {fmt(r['peak_extra_gib'], '.2f')} | {r['error'] or ''} |")
    return "\n".join(lines) + "\n"
