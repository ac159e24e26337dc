"""Host time of the kernels' Python wrappers: what one call costs the CPU that issues it.

A training step of a small model is bound by the host when its kernels are issued about as
fast as the GPU runs them (reports/step: the 1B LoRA step's host issue time is near its step
time), so every microsecond of Python per call counts there, 16 layers times over.

    PYTHONPATH=src python scripts/host_overhead.py OUT.json            # on a GPU
    TRITON_INTERPRET=1 PYTHONPATH=src python scripts/host_overhead.py OUT.json --stub

Each case (a decoder layer's kernels in order, attention aside, with one backward from a
scalar; then rms_norm, rope, swiglu, lora_o, lora_qkv, lora_mlp alone, whose backward time
includes torch.autograd.backward's own per-call cost; tiny shapes, bf16, every gradient on)
is timed as the mean wall time of many calls, forward alone and forward + backward, without
synchronizing in between: on a GPU the tensors are so small that the
device keeps up and the time is the host's issue time, Triton's launches and cuBLAS's
included. ``--stub`` (CPU) replaces every Triton launch and GEMM by a no-op, so what is left
is the wrappers' own host work: validation, views, allocations, autograd; useful to compare
two revisions of the wrappers, not as a GPU number. The best of five rounds is reported.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time


def _stub_device_work(torch) -> None:
    """Triton launches and the GEMMs become no-ops (their outputs keep whatever they held)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    JITFunction.run = InterpretedFunction.run = lambda self, *a, **k: None

    def mm(a, b, out=None, **_):
        return out if out is not None else torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)

    def addmm(c, a, b, out=None, **_):
        return out if out is not None else torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)

    torch.mm, torch.addmm = mm, addmm
    torch.Tensor.addmm_ = lambda self, *a, **k: self


def _cases(torch, device):
    from workbench.kernels.lora_mlp import lora_mlp
    from workbench.kernels.lora_o import lora_o
    from workbench.kernels.lora_qkv import lora_qkv
    from workbench.kernels.rms_norm import rms_norm
    from workbench.kernels.rope import rope
    from workbench.kernels.swiglu import swiglu

    dt, hidden, inter, r = torch.bfloat16, 64, 128, 4

    def t(*shape, grad=True):
        return torch.randn(*shape, dtype=dt, device=device).requires_grad_(grad)

    def linear(out, d_in):
        return t(out, d_in, grad=False), t(r, d_in), t(out, r)

    x = t(2, 8, hidden)
    q, k, cos, sin = t(2, 4, 8, 16), t(2, 2, 8, 16), t(2, 8, 16, grad=False), t(2, 8, 16, grad=False)
    g, u, w = t(2, 8, inter), t(2, 8, inter), t(hidden)
    qp, kp, vp, op = linear(hidden, hidden), linear(32, hidden), linear(32, hidden), linear(hidden, hidden)
    gp, up, dp = linear(inter, hidden), linear(inter, hidden), linear(hidden, inter)
    w2 = t(hidden)

    def layer():
        """A Llama decoder layer's kernels in order, attention aside (q stands in for its output)."""
        h = rms_norm(x, w, 1e-6)
        q_, k_, _ = lora_qkv(h, *qp, *kp, *vp, 2.0)
        q_, k_ = rope(q_.view(2, 8, 4, 16).transpose(1, 2), k_.view(2, 8, 2, 16).transpose(1, 2), cos, sin)
        s = x + lora_o(q_.transpose(1, 2).reshape(2, 8, hidden), *op, 2.0)
        return (s + lora_mlp(rms_norm(s, w2, 1e-6), *gp, *up, *dp, 2.0)).float().sum() + k_.float().sum()

    return {
        "layer": layer,
        "rms_norm": lambda: rms_norm(x, w, 1e-6),
        "rope": lambda: rope(q, k, cos, sin),
        "swiglu": lambda: swiglu(g, u),
        "lora_o": lambda: lora_o(x, *op, 2.0),
        "lora_qkv": lambda: lora_qkv(x, *qp, *kp, *vp, 2.0),
        "lora_mlp": lambda: lora_mlp(x, *gp, *up, *dp, 2.0),
    }


def _time(fn, calls: int, rounds: int = 5) -> float:
    for _ in range(max(calls // 10, 20)):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--stub", action="store_true", help="CPU: Triton launches and GEMMs as no-ops")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    if args.stub:
        _stub_device_work(torch)
    device = "cpu" if args.stub else "cuda"
    rows = []
    for name, forward in _cases(torch, device).items():
        out = forward()
        outs = out if isinstance(out, tuple) else (out,)
        grads = [torch.ones_like(o) for o in outs]

        def step():
            torch.autograd.backward(forward(), grads)

        fwd = _time(forward, args.calls)
        both = _time(step, args.calls // 2)
        if device == "cuda":
            torch.cuda.synchronize()
        rows.append({"case": name, "forward_us": round(fwd, 2), "forward_backward_us": round(both, 2)})
        print(f"{name:9s} forward {fwd:7.1f} us   forward+backward {both:7.1f} us", flush=True)
    doc = {"mode": "stub (CPU, device work stubbed)" if args.stub else "gpu (real launches, tiny shapes)",
           "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "python": sys.version.split()[0], "calls": args.calls,
           "note": "wall time per call, best of 5 rounds, no synchronize between calls", "rows": rows}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
