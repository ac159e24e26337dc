"""Kernel micro-benchmarks: every registered kernel against its PyTorch reference
(eager, as HF runs it in the dtype), ``torch.compile`` of that reference, and
Liger-Kernel's equivalent where it is installed — all in the same process.

Measured per stack: forward ms, forward+backward ms (medians of triton's
``do_bench_cudagraph`` or ``do_bench`` samples on CUDA; wall-clock medians on the CPU,
for smoke tests only) and the peak extra memory of one forward+backward. Shapes come
from real models (Llama-3.1-8B by default). Nothing here asserts a speed.

``pytest bench/`` runs them as pytest-benchmark benchmarks (:func:`prepare` the cases,
:func:`measure` each, :func:`record` the samples); its ``--benchmark-json`` file is the
record that ``workbench bench kernels`` turns into the report and its plots
(:func:`from_benchmark_json`, :func:`markdown`, :func:`plot`).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from workbench.errors import UserError
from workbench.kernels import registry
from workbench.markdown import table

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
    # The "torch" stack when the reference twin is not what HF/PEFT run (the twins compute in
    # fp32 for the parity yardstick; HF runs its matmuls in the activation dtype).
    torch_call: Callable[[], Any] | None = None
    torch_label: str = "torch"
    others: dict[str, Callable[[], Callable[[], Any]]] = field(default_factory=dict)  # e.g. bitsandbytes


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
    # Qwen3-4B's config.json: hidden 2560, intermediate 9728, 32 heads / 8 KV heads of 128, vocab 151936.
    "qwen3-4b": dict(tokens=8192, batch=4, hidden=2560, inter=9728, heads=32, kv=8, head_dim=128,
                     vocab=151936, rank=16),
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
                        liger=(lambda: (lambda m=flce_cls(): m(lm, hid, target))) if flce_cls else None,
                        # HF: lm_head in the activation dtype, logits upcast to fp32, then the loss.
                        torch_call=lambda: F.cross_entropy(F.linear(hid, lm).float(), target),
                        torch_label="torch (HF eager)", others=_flce_chunk_stacks(hid, lm, target, n)))
    out += _lora_cases(s, device, dtype, el)
    out += _nf4_cases(s, device, dtype)
    return out


#: Chunk sizes (rows) timed besides the default, to show where the default sits.
FLCE_CHUNKS = (256, 1024, 2048, 4096)


def _flce_chunk_stacks(hid, lm, target, n: int) -> dict:
    from workbench.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    return {f"ours (chunk {c})": (lambda c=c: (lambda: fused_linear_cross_entropy(hid, lm, target, chunk_size=c)))
            for c in FLCE_CHUNKS if c < n}


def _peft_linear(x, W, A, B, s):
    """PEFT's LoRA linear as it runs eagerly: base_layer(x) + lora_B(lora_A(x)) * scaling."""
    return F.linear(x, W) + F.linear(F.linear(x, A), B) * s


def _lora_cases(s: dict, device, dtype, el: int) -> list[Case]:
    """LoRA (rank s["rank"], frozen 16-bit W) on the model's MLP and attention projections.
    The floor counts the two frozen-W matmuls (forward and dX; W gets no gradient)."""
    n, h, inter, r = s["tokens"], s["hidden"], s["inter"], s["rank"]
    q, kv = s["heads"] * s["head_dim"], s["kv"] * s["head_dim"]  # q is wider than hidden in Qwen3-4B
    scaling = 2.0
    x = _randn((n, h), device, dtype, grad=True)

    def lin(d_out, d_in):
        return (_randn((d_out, d_in), device, dtype, d_in ** -0.5), _randn((r, d_in), device, dtype, d_in ** -0.5,
                grad=True), _randn((d_out, r), device, dtype, r ** -0.5, grad=True))
    out = []
    W, A, B = lin(inter, h)
    out.append(Case("lora_o", f"{n}x{h} -> {inter}, r{r}", {"x": x, "W": W, "A": A, "B": B},
                    {"scaling": scaling}, ("x", "A", "B"), flops=2 * 2 * n * h * inter,
                    torch_call=lambda: _peft_linear(x, W, A, B, scaling), torch_label="torch (PEFT eager)"))
    (Wq, Aq, Bq), (Wk, Ak, Bk), (Wv, Av, Bv) = lin(q, h), lin(kv, h), lin(kv, h)
    out.append(Case("lora_qkv", f"{n}x{h} -> {q}/{kv}/{kv}, r{r}",
                    {"x": x, "Wq": Wq, "Aq": Aq, "Bq": Bq, "Wk": Wk, "Ak": Ak, "Bk": Bk, "Wv": Wv, "Av": Av,
                     "Bv": Bv}, {"scaling": scaling}, ("x", "Aq", "Bq", "Ak", "Bk", "Av", "Bv"),
                    flops=2 * 2 * n * h * (q + 2 * kv),
                    torch_call=lambda: tuple(_peft_linear(x, *w, scaling) for w in
                                             ((Wq, Aq, Bq), (Wk, Ak, Bk), (Wv, Av, Bv))),
                    torch_label="torch (PEFT eager)"))
    (Wg, Ag, Bg), (Wu, Au, Bu), (Wd, Ad, Bd) = lin(inter, h), lin(inter, h), lin(h, inter)

    def peft_mlp():
        act = F.silu(_peft_linear(x, Wg, Ag, Bg, scaling)) * _peft_linear(x, Wu, Au, Bu, scaling)
        return _peft_linear(act, Wd, Ad, Bd, scaling)
    out.append(Case("lora_mlp", f"{n}x{h} -> {inter} -> {h}, r{r}",
                    {"x": x, "Wg": Wg, "Ag": Ag, "Bg": Bg, "Wu": Wu, "Au": Au, "Bu": Bu, "Wd": Wd, "Ad": Ad,
                     "Bd": Bd}, {"scaling": scaling}, ("x", "Ag", "Bg", "Au", "Bu", "Ad", "Bd"),
                    flops=2 * 2 * 3 * n * h * inter, torch_call=peft_mlp, torch_label="torch (PEFT eager)"))
    return out


def _nf4_cases(s: dict, device, dtype) -> list[Case]:
    """Dequantizing one frozen NF4 weight (double quant) of the MLP's shape, forward only."""
    from workbench.kernels.nf4 import NF4Weight

    shape = (s["inter"], s["hidden"])
    q = NF4Weight.quantize(_randn(shape, device, torch.float32, 0.02), double_quant=True)
    tensors = {"packed": q.packed, "absmax": q.absmax, "code": q.code, "nested_absmax": q.nested_absmax,
               "offset": q.offset}
    numel = shape[0] * shape[1]
    el = torch.tensor([], dtype=dtype).element_size()
    others = {}
    try:
        import bitsandbytes.functional as bnbf

        if device.type == "cuda":
            wq, state = bnbf.quantize_4bit(_randn(shape, device, dtype, 0.02), quant_type="nf4",
                                           compress_statistics=True)
            others["bitsandbytes"] = lambda: (lambda: bnbf.dequantize_4bit(wq, state))
    except Exception:  # not installed
        pass
    return [Case("nf4_dequant", f"{shape[0]}x{shape[1]} blocksize 64, double quant", tensors,
                 {"shape": shape, "blocksize": 64, "dtype": dtype}, (),
                 bytes_moved=numel // 2 + numel // 64 + numel * el, others=others)]


# --------------------------------------------------------------------------- timing
#: How CUDA times are taken. "graph": the callable is captured in a CUDA graph (several
#: calls unrolled) and replayed, so the time is the device's work alone, without the
#: Python and launch overhead of each call (triton's ``do_bench_cudagraph``). In
#: training the CPU runs ahead of the GPU and that overhead hides behind earlier
#: kernels; in a micro-benchmark of a sub-millisecond step it does not, and such rows
#: moved by about 2x between two runs of one command (the kernels regress reports).
#: "events": one call between CUDA events, L2 flushed
#: before each (triton's ``do_bench``): launch overhead included. A case whose callables
#: cannot be captured (one of them synchronizes with the host, say) is timed with
#: events in every stack, so its ratios still compare like with like; the row says so.
TIMINGS = ("graph", "events")
#: What is timed per stack: the forward alone, and forward + backward (a case with
#: nothing to differentiate, nf4_dequant, has the forward only).
PASSES = ("fwd", "fwd_bwd")


def _timer(device: torch.device, timing: str = "graph") -> Callable[[Callable[[], Any]], list[float]]:
    """A function that times a callable and returns its samples in ms, whose median is the
    reported time: triton's samples on CUDA (graph replays, each the mean of the calls
    unrolled in the graph; or CUDA-event timings of one call), three wall-clock runs after
    a warm-up on the CPU."""
    if timing not in TIMINGS:
        raise ValueError(f"timing must be one of {TIMINGS}, got {timing!r}")
    if device.type == "cuda":
        import triton.testing

        if timing == "graph":
            return lambda fn: [float(t) for t in triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="all")]
        return lambda fn: [float(t) for t in triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="all")]

    def wall(fn, reps=3):
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    return wall


def graph_blocker(calls: dict[str, Callable[[], Any]], device: torch.device) -> str | None:
    """Why these callables cannot be captured in a CUDA graph (the first one that
    synchronizes with the host, after a warm-up call that may compile or autotune),
    or None. Other errors are left to the timing loop, which records them."""
    if device.type != "cuda":
        return None
    for name, call in calls.items():
        try:
            call()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                call()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
        except RuntimeError as err:
            if "synchroniz" in str(err):
                return f"{name} synchronizes with the host"
        except Exception:  # noqa: BLE001 - recorded when the stack is timed
            pass
    return None


def _fwd_bwd(call: Callable[[], Any], leaves: list[torch.Tensor]) -> Callable[[], None]:
    def step():
        for t in leaves:
            t.grad = None
        out = call()
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                if isinstance(o, torch.Tensor) and o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return step


def _peak_extra(step: Callable[[], None], device: torch.device, leaves: list[torch.Tensor]) -> float | None:
    """Peak memory of one step above what existed before it, with the previous step's
    gradients freed first (else the step's own `grad = None` lowers the baseline)."""
    if device.type != "cuda":
        return None
    for t in leaves:
        t.grad = None
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
    timing: str | None = None            # "graph" or "events" (TIMINGS); None on the CPU and for the floor
    samples: dict[str, list[float]] = field(default_factory=dict)  # pass (PASSES) -> the timer's samples, ms


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


def floor_ms(case: Case, ceilings: dict) -> float | None:
    """The case's floor: its minimal bytes at the measured copy rate or its matmul FLOPs at
    the measured bf16 rate, whichever takes longer (None without ceilings: on the CPU)."""
    if not ceilings:
        return None
    return max(case.bytes_moved / ceilings["copy_bytes_per_s"], case.flops / ceilings["bf16_flops_per_s"]) * 1e3


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Prepared:
    """A case and its stacks: the callable of each, and the stacks that could not be built (why)."""
    case: Case
    calls: dict[str, Callable[[], Any]]
    unbuilt: dict[str, str] = field(default_factory=dict)

    @property
    def stacks(self) -> list[str]:
        return [*self.calls, *self.unbuilt]

    @property
    def leaves(self) -> list[torch.Tensor]:
        return [self.case.tensors[g] for g in self.case.grads]

    @property
    def passes(self) -> tuple[str, ...]:
        return PASSES if self.case.grads else PASSES[:1]


def prepare(shape_name: str = "llama3-8b", dtype: torch.dtype = torch.bfloat16, only: list[str] | None = None,
            compile_reference: bool = True, device: torch.device | None = None) -> list[Prepared]:
    """The cases of a shape set (those of the kernels in ``only``, when given), each with its
    stacks: ours, the PyTorch reference (or what HF/PEFT run), ``torch.compile`` of it (CUDA
    only), the others the case names (bitsandbytes) and Liger."""
    device = device or default_device()
    specs = registry()
    out = []
    for case in cases(shape_name, device, dtype):
        if only and case.kernel not in only:
            continue
        spec = specs[case.kernel]
        calls: dict[str, Callable[[], Any]] = {
            "ours": lambda spec=spec, c=case: spec.fn(**c.tensors, **c.options),
            case.torch_label: case.torch_call or (lambda spec=spec, c=case: spec.reference(**c.tensors, **c.options)),
        }
        if compile_reference and device.type == "cuda":
            if case.torch_call is not None:
                calls["torch.compile"] = torch.compile(case.torch_call, dynamic=False)
            else:
                compiled = torch.compile(spec.reference, dynamic=False)
                calls["torch.compile"] = lambda c=case, f=compiled: f(**c.tensors, **c.options)
        for label, build in case.others.items():
            calls[label] = build()
        unbuilt = {}
        if case.liger is not None:
            try:
                calls["liger"] = case.liger()
            except Exception as err:  # noqa: BLE001 - the stack's row says why
                unbuilt["liger"] = f"{type(err).__name__}: {err}"
        out.append(Prepared(case, calls, unbuilt))
    return out


def measure(prepared: Prepared, device: torch.device, timing: str = "graph", stacks: list[str] | None = None,
            progress: Callable[[str], None] = print) -> list[Row]:
    """Time the stacks of one case (those named in ``stacks``, else all): forward ms,
    forward + backward ms (their samples in ``Row.samples``) and the peak extra memory of
    one forward + backward. The case is timed one way in all its stacks: with CUDA events
    when one of them cannot be captured in a CUDA graph (it synchronizes with the host, or
    its capture fails while timing: then the case is timed again). Every stack is probed,
    named or not, so that a stack's timing does not depend on which others were asked for.
    A stack that fails is a row with its error."""
    _timer(device, timing)  # validates the choice
    case, leaves = prepared.case, prepared.leaves
    wanted = [s for s in prepared.stacks if stacks is None or s in stacks]
    calls = {s: prepared.calls[s] for s in wanted if s in prepared.calls}
    unbuilt = [Row(case.kernel, case.shape, s, error=prepared.unbuilt[s]) for s in wanted if s in prepared.unbuilt]
    case_timing, why_events = timing, None
    if device.type == "cuda" and timing == "graph":
        probes = {}
        for stack, call in prepared.calls.items():
            probes[f"{stack} forward"] = lambda call=call: _no_grad(call)
            if leaves:
                probes[f"{stack} backward"] = _fwd_bwd(call, leaves)
        why_events = graph_blocker(probes, device)
        if why_events:
            case_timing = "events"
            progress(f"[bench] {case.kernel}: timed with CUDA events, not graphs ({why_events})")
    rows = _time_stacks(case, calls, leaves, device, _timer(device, case_timing), case_timing, why_events, progress)
    failed = [r for r in rows if r.error and "captur" in r.error.lower()]
    if case_timing == "graph" and failed:  # a capture failure the probe did not foresee: redo the case
        why_events = f"{failed[0].stack} could not be captured ({failed[0].error})"
        progress(f"[bench] {case.kernel}: timed with CUDA events, not graphs ({why_events})")
        torch.cuda.synchronize()
        rows = _time_stacks(case, calls, leaves, device, _timer(device, "events"), "events", why_events, progress)
    for t in case.tensors.values():
        if isinstance(t, torch.Tensor):
            t.grad = None
    by_stack = {r.stack: r for r in rows + unbuilt}
    return [by_stack[s] for s in wanted]


def _time_stacks(case: Case, stacks: dict, leaves: list, device: torch.device, timer, timing: str,
                 why_events: str | None, progress) -> list[Row]:
    """One row per stack of ``case``: forward ms, forward+backward ms, peak extra memory."""
    rows = []
    for stack, call in stacks.items():
        progress(f"[bench] {case.kernel} {case.shape} {stack}")
        row = Row(case.kernel, case.shape, stack, timing=timing if device.type == "cuda" else None)
        if why_events:
            row.extra["timing_note"] = f"CUDA events in every stack of this kernel: {why_events}"
        try:
            with torch.no_grad():
                row.samples["fwd"] = timer(call)
            row.fwd_ms = statistics.median(row.samples["fwd"])
            if leaves:
                step = _fwd_bwd(call, leaves)
                row.samples["fwd_bwd"] = timer(step)
                row.fwd_bwd_ms = statistics.median(row.samples["fwd_bwd"])
            else:  # nothing to differentiate (NF4 dequant): the forward is the whole step
                step = call
            row.peak_extra_gib = _peak_extra(step, device, leaves)
        except torch.cuda.OutOfMemoryError as err:
            row.error = f"OOM: {str(err).splitlines()[0]}"
            torch.cuda.empty_cache()
        except Exception as err:  # noqa: BLE001 - recorded in the report, never hidden
            row.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        rows.append(row)
    return rows


def _no_grad(call: Callable[[], Any]) -> Any:
    with torch.no_grad():
        return call()


# --------------------------------------------------------------------------- pytest-benchmark
# `pytest bench/` (bench/conftest.py) times every case with `measure` and hands each
# (case, stack, pass) to pytest-benchmark; its JSON is the record that the report, the
# plots and `workbench regress` are made from (`from_benchmark_json`).
_device_seconds = 0.0


def device_clock() -> float:
    """The timer of the kernel benchmarks in pytest-benchmark (``@pytest.mark.benchmark(timer=...)``):
    seconds of measured time, advanced only by :func:`record` replaying a sample. pytest-benchmark
    reads its timer around each round; a host clock there would time the Python that launches the
    kernels, not the device's work."""
    return _device_seconds


def record(benchmark, samples_ms: list[float]) -> None:
    """Give pytest-benchmark the samples :func:`measure` took (ms), one pedantic round each, timed by
    :func:`device_clock`: its statistics, JSON and ``--benchmark-compare(-fail)`` are then those of the
    device time, and its median is the report's number."""
    global _device_seconds
    _device_seconds = 0.0  # each benchmark starts from zero: no rounding from a long sum
    samples = iter(samples_ms)

    def replay():
        global _device_seconds
        _device_seconds += next(samples) * 1e-3
    benchmark.pedantic(replay, rounds=len(samples_ms), iterations=1, warmup_rounds=0)


#: The keys of every benchmark's ``extra_info`` (docs/benchmarks.md says what each holds).
EXTRA_INFO = ("kernel", "shape", "stack", "pass", "case_index", "stack_index", "shape_set", "dtype", "timing",
              "timing_note", "peak_extra_gib", "bytes_moved", "flops", "floor_ms", "device", "versions")


def extra_info(prepared: Prepared, row: Row, pass_: str, *, case_index: int, stack_index: int, shape_set: str,
               dtype: str, floor: float | None, env: dict) -> dict:
    """What a benchmark's numbers need besides its times (pytest-benchmark has no field for them)."""
    case = prepared.case
    return {"kernel": case.kernel, "shape": case.shape, "stack": row.stack, "pass": pass_, "case_index": case_index,
            "stack_index": stack_index, "shape_set": shape_set, "dtype": dtype, "timing": row.timing or "wall",
            "timing_note": row.extra.get("timing_note"), "peak_extra_gib": row.peak_extra_gib,
            "bytes_moved": case.bytes_moved, "flops": case.flops, "floor_ms": floor, "device": env.get("device"),
            "versions": {k: env.get(k) for k in ("torch", "cuda", "triton", "transformers", "liger_kernel")}}


def from_benchmark_json(doc: dict, source: str = "the JSON") -> dict:
    """The kernels report (what `workbench bench kernels` writes: suite, environment, command,
    shape, dtype, timing, ceilings, rows) from a ``pytest bench/ --benchmark-json`` file: a row per
    (case, stack) with the medians of its benchmarks (forward; forward + backward) and the peak and
    timing of their ``extra_info``, a stack that failed as a row with its error, and a floor row
    per case. The ``workbench`` section that bench/conftest.py adds holds the run's setup."""
    section = doc.get("workbench") if isinstance(doc, dict) else None
    if not isinstance(section, dict) or section.get("suite") != "kernels" or not isinstance(doc.get("benchmarks"),
                                                                                            list):
        raise UserError(f"{source} is not a JSON of `pytest bench/ --benchmark-json=FILE` (it has no kernels "
                        "section); pass one that pytest bench/ wrote.")
    rows: dict[tuple[int, int], dict] = {}
    for bench in doc["benchmarks"]:
        info = bench.get("extra_info") or {}
        key = (info["case_index"], info["stack_index"])
        row = rows.setdefault(key, {
            "kernel": info["kernel"], "shape": info["shape"], "stack": info["stack"], "fwd_ms": None,
            "fwd_bwd_ms": None, "peak_extra_gib": info.get("peak_extra_gib"), "error": None,
            "extra": {"timing_note": info["timing_note"]} if info.get("timing_note") else {},
            "timing": info["timing"] if info.get("timing") in TIMINGS else None})
        row[f"{info['pass']}_ms"] = bench["stats"]["median"] * 1e3
    for err in section.get("errors") or []:
        rows[(err["case_index"], err["stack_index"])] = {
            "kernel": err["kernel"], "shape": err["shape"], "stack": err["stack"], "fwd_ms": None, "fwd_bwd_ms": None,
            "peak_extra_gib": None, "error": err["error"], "extra": {}, "timing": None}
    out = []
    for case in sorted(section.get("cases") or [], key=lambda c: c["case_index"]):
        out += [rows[k] for k in sorted(rows) if k[0] == case["case_index"]]
        out.append({"kernel": case["kernel"], "shape": case["shape"], "stack": "floor", "fwd_ms": None,
                    "fwd_bwd_ms": case.get("floor_ms"), "peak_extra_gib": None, "error": None,
                    "extra": {"bytes_moved": case.get("bytes_moved"), "flops": case.get("flops")}, "timing": None})
    return {"suite": "kernels", "environment": section.get("environment") or {}, "command": section.get("command"),
            "shape": section.get("shape"), "shape_dims": section.get("shape_dims") or {}, "dtype": section.get("dtype"),
            "timing": section.get("timing"), "ceilings": section.get("ceilings") or {}, "rows": out}


def markdown(result: dict, env: dict, command: str, png_name: str | None = None) -> str:
    lines = [
        f"# Kernel micro-benchmarks — {env['device']} — {env['date']}",
        "",
        f"- **Command:** `{command}`",
        *([(f"- **Timed by:** `{result['benchmark_command']}`, " if result.get("benchmark_command") not in (None, command)
            else "- **Timed by:** the command above, ") + "one pytest-benchmark benchmark per kernel, stack and pass, "
           f"in `{result['benchmark_json']}` (each time here is a benchmark's median)"]
          if result.get("benchmark_json") else []),
        f"- **Shapes:** `{result['shape']}` {result['shape_dims']}, dtype {result['dtype']}",
        f"- **Versions:** torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
        f"transformers {env['transformers']}, liger-kernel {env.get('liger_kernel')}",
        "- **Stacks:** `ours` (Triton kernels); `torch` (the PyTorch reference twin, eager; it computes in fp32 "
        "where HF does: norms, activations, the loss); `torch (HF eager)` / `torch (PEFT eager)` where the twin "
        "is not what HF/PEFT run (their matmuls in the activation dtype); `torch.compile` (of that torch stack); "
        "`liger` (Liger-Kernel) and `bitsandbytes` when installed; `floor` (minimal bytes at the measured copy "
        "rate, or matmul FLOPs at the measured bf16 rate, whichever is larger).",
        "- Times are medians in ms: " + {
            "graph": "device time of the call replayed from a CUDA graph (triton `do_bench_cudagraph`; launch and "
                     "Python overhead excluded, as in training, where the CPU runs ahead). A kernel whose callables "
                     "synchronize with the host is timed with CUDA events in all its stacks (note column).",
            "events": "one call between CUDA events, L2 flushed before each (triton `do_bench`; launch and "
                      "Python overhead included).",
            "wall": "wall clock on the CPU (a smoke test, not a measurement of the kernels)."}.get(
            result.get("timing", "events"), "triton `do_bench`.")
        + " `vs torch` is the torch stack's time over this row's, same run and same timing (forward only for "
        "nf4_dequant, which has no gradient); peak is the extra memory of one forward+backward.",
        "",
    ]
    torch_ms = {r["kernel"]: _step_ms(r) for r in result["rows"]
                if r["stack"] == "torch" or r["stack"].startswith("torch (")}

    def fmt(v, spec=".3f"):
        return "—" if v is None else format(v, spec)

    rows = []
    for r in result["rows"]:
        base, mine = torch_ms.get(r["kernel"]), _step_ms(r)
        ratio = f"{base / mine:.2f}x" if base and mine and r["stack"] != "floor" else ""
        rows.append([r["kernel"], r["shape"], r["stack"], fmt(r["fwd_ms"]), fmt(r["fwd_bwd_ms"]), ratio,
                     fmt(r["peak_extra_gib"], ".2f"), r["error"] or (r.get("extra") or {}).get("timing_note") or ""])
    lines += table(["kernel", "shape", "stack", "fwd ms", "fwd+bwd ms", "vs torch (fwd+bwd)", "peak extra GiB", "note"],
                   rows, align="lllrrrrl")
    if png_name:
        lines += ["", f"![roofline of our kernels and time per kernel and stack]({png_name})"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plot
#: Stacks drawn in the timing panel, in order, with their colours; eager is any
#: ``torch`` / ``torch (HF eager)`` / ``torch (PEFT eager)`` row.
PLOT_STACKS = {"ours": "tab:blue", "eager": "tab:gray", "torch.compile": "tab:orange", "liger": "tab:green",
               "bitsandbytes": "tab:purple"}


def _step_ms(row: dict) -> float | None:
    """Forward + backward, or the forward where nothing is differentiable (nf4_dequant)."""
    return row["fwd_bwd_ms"] if row.get("fwd_bwd_ms") is not None else row.get("fwd_ms")


def _plot_stack(stack: str) -> str | None:
    if stack == "torch" or stack.startswith("torch ("):
        return "eager"
    return stack if stack in PLOT_STACKS else None


def roofline(result: dict) -> dict:
    """Our stack per kernel against the ceilings, from the byte and FLOP counts of its
    floor row. ``points``: kernels that carry both counts (placed on the roofline);
    ``one_count``: kernels with only bytes or only FLOPs, as a rate and a fraction of
    the matching ceiling (their intensity is unknown, so they are not placed)."""
    ceilings = result.get("ceilings") or {}
    counts = {r["kernel"]: r.get("extra") or {} for r in result["rows"] if r["stack"] == "floor"}
    points, one_count = [], []
    for r in result["rows"]:
        ms = _step_ms(r)
        if r["stack"] != "ours" or r.get("error") or not ms:
            continue
        nbytes, flops = counts.get(r["kernel"], {}).get("bytes_moved"), counts.get(r["kernel"], {}).get("flops")
        seconds = ms * 1e-3
        if nbytes and flops:
            intensity, rate = flops / nbytes, flops / seconds
            roof = None
            if ceilings:
                roof = min(ceilings["copy_bytes_per_s"] * intensity, ceilings["bf16_flops_per_s"])
            points.append({"kernel": r["kernel"], "intensity": intensity, "flops_per_s": rate,
                           "fraction": rate / roof if roof else None})
        elif nbytes or flops:
            kind = "bytes" if nbytes else "flops"
            rate = (nbytes or flops) / seconds
            ceiling = ceilings.get("copy_bytes_per_s" if nbytes else "bf16_flops_per_s")
            one_count.append({"kernel": r["kernel"], "kind": kind, "rate": rate,
                              "fraction": rate / ceiling if ceiling else None})
    return {"points": points, "one_count": one_count}


def stack_times(result: dict) -> tuple[list[str], list[str], dict]:
    """(kernels in report order, stacks present, {(kernel, stack): ms, or the row's
    error when it failed}) for the timing panel; ms is forward+backward, else forward."""
    kernels, stacks, times = [], set(), {}
    for r in result["rows"]:
        stack = _plot_stack(r["stack"])
        if stack is None:
            continue
        if r["kernel"] not in kernels:
            kernels.append(r["kernel"])
        stacks.add(stack)
        ms = _step_ms(r)
        times.setdefault((r["kernel"], stack), ms if ms and not r.get("error") else (r.get("error") or "no time"))
    return kernels, [s for s in PLOT_STACKS if s in stacks], times


def _rate(value: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _draw_roofline(ax, result: dict) -> None:
    ceilings, data = result.get("ceilings") or {}, roofline(result)
    points = data["points"]
    ridge = ceilings["bf16_flops_per_s"] / ceilings["copy_bytes_per_s"] if ceilings else None
    xs = [p["intensity"] for p in points] + ([ridge] if ridge else [])
    lo, hi = (min(xs) / 30, max(xs) * 30) if xs else (0.1, 1e4)
    if ceilings:
        bw, peak = ceilings["copy_bytes_per_s"], ceilings["bf16_flops_per_s"]
        ax.plot([lo, ridge, hi], [bw * lo, peak, peak], color="black", lw=1.5)
        ax.axvline(ridge, color="black", lw=0.6, ls=":")
        x = (lo * ridge) ** 0.5
        ax.text(x / 1.2, bw * x * 1.2, f"copy {_rate(bw, 'B/s')}", fontsize=8, ha="right", va="bottom")
        ax.text(hi / 1.3, peak * 1.15, f"bf16 matmul {_rate(peak, 'FLOP/s')}", fontsize=8, ha="right")
    for p in points:
        ax.plot(p["intensity"], p["flops_per_s"], "o", color=PLOT_STACKS["ours"], ms=7)
        note = f"\n{p['fraction']:.0%} of roof" if p["fraction"] else ""
        ax.annotate(p["kernel"] + note, (p["intensity"], p["flops_per_s"]), textcoords="offset points",
                    xytext=(-8, -6), ha="right", va="top", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    if ceilings:
        ax.set_ylim(ceilings["copy_bytes_per_s"] * lo / 3, ceilings["bf16_flops_per_s"] * 3)
    ax.set_xlabel("arithmetic intensity (counted FLOPs / counted bytes, fwd+bwd)")
    ax.set_ylabel("achieved FLOP/s (ours)")
    ax.set_title("Roofline: ours" + ("" if ceilings else " (no ceilings measured on this device)"))
    ax.grid(alpha=0.3, which="both")
    if not points:
        ax.text(0.5, 0.6, "nothing to place: no timed kernel of ours\ncarries both a byte and a FLOP count",
                transform=ax.transAxes, ha="center", fontsize=9, color="dimgray")
    if data["one_count"]:
        lines = ["bytes or FLOPs counted, not both (not placed):",
                 "kernel, achieved rate" + (", share of its ceiling" if ceilings else "")]
        width = max(len(o["kernel"]) for o in data["one_count"])
        for o in data["one_count"]:
            unit = "B/s" if o["kind"] == "bytes" else "FLOP/s"
            share = f"  {o['fraction']:4.0%}" if o["fraction"] is not None else ""
            lines.append(f"{o['kernel']:<{width}} {_rate(o['rate'], unit):>13}{share}")
        ax.text(0.98, 0.03, "\n".join(lines), transform=ax.transAxes, ha="right", va="bottom", fontsize=7.5,
                multialignment="left", family="monospace",
                bbox={"facecolor": "white", "edgecolor": "lightgray", "alpha": 0.9})


def _draw_times(ax, result: dict) -> None:
    kernels, stacks, times = stack_times(result)
    floors = {r["kernel"]: r["fwd_bwd_ms"] for r in result["rows"] if r["stack"] == "floor" and r.get("fwd_bwd_ms")}
    height = 0.8 / max(len(stacks), 1)
    values = [v for v in times.values() if isinstance(v, float)] + list(floors.values())
    right = max(values) * 8 if values else 10.0
    ax.set_xscale("log")
    labelled = set()
    for j, stack in enumerate(stacks):
        for i, kernel in enumerate(kernels):
            if (kernel, stack) not in times:
                continue
            y, value = i + (j - (len(stacks) - 1) / 2) * height, times[(kernel, stack)]
            if isinstance(value, float):
                ax.barh(y, value, height=height, color=PLOT_STACKS[stack],
                        label=None if stack in labelled else stack)
                labelled.add(stack)
                ax.text(value * 1.08, y, f"{value:.3g}", va="center", fontsize=6)
            else:
                ax.text(0.01, y, f"{stack}: {'failed' if value != 'no time' else 'no time'}", va="center",
                        transform=ax.get_yaxis_transform(), fontsize=6, color="tab:red")
    for i, kernel in enumerate(kernels):
        if kernel in floors:
            ax.plot([floors[kernel]] * 2, [i - 0.45, i + 0.45], color="black", lw=1, ls="--",
                    label=None if "floor" in labelled else "floor")
            labelled.add("floor")
    forward_only = {r["kernel"] for r in result["rows"] if _plot_stack(r["stack"]) and r.get("fwd_ms") is not None
                    and r.get("fwd_bwd_ms") is None and not r.get("error")}
    ax.set_yticks(range(len(kernels)), [k + (" (fwd)" if k in forward_only else "") for k in kernels], fontsize=8)
    ax.set_ylim(len(kernels) - 0.5, -0.5)
    left = min(values) / 3 if values else 1e-3
    ax.set_xlim(left, right)
    ax.set_xlabel("forward + backward ms, median (log)")
    ax.set_title("Time per kernel and stack (shorter is faster)")
    ax.grid(alpha=0.3, axis="x", which="both")
    if labelled:
        ax.legend(fontsize=8, loc="lower right")


def plot(result: dict, path: Path, env: dict | None = None) -> Path:
    """One PNG: a roofline of our kernels (left) and every stack's time per kernel (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = env or result.get("environment") or {}
    kernels = stack_times(result)[0]
    fig, (roof, bars) = plt.subplots(1, 2, figsize=(16, max(6.0, 0.12 * len(result["rows"]) + 2.5)),
                                     gridspec_kw={"width_ratios": [1, 1.15]})
    _draw_roofline(roof, result)
    _draw_times(bars, result)
    dims = result.get("shape_dims") or {}
    size = ", ".join(f"{k} {dims[k]}" for k in ("tokens", "hidden", "vocab") if k in dims)
    fig.suptitle(f"Kernel micro-benchmarks — {env.get('device', 'unknown device')}"
                 + (f" — {env['date']}" if env.get("date") else "")
                 + f"\nshape {result['shape']}" + (f" ({size})" if size else "")
                 + f", {result.get('dtype', '')}, {len(kernels)} kernels", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
