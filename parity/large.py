"""Dedicated cases past 2^31 elements (the ``gpu`` profile only): the dynamic counterpart of
the static int64 check (``int64_offsets.py``). A kernel that forms ``program_id * stride``
in int32 passes every property shape and wraps here: its last rows read and write 2^32
elements away (an illegal address, or garbage).

* ``cross_entropy``: bf16 logits [8193, 262144] (2^31 + 2^18 elements, 4.3 GB), reduction
  "none" with a per-row upstream gradient, some rows ignored;
* ``fused_linear_cross_entropy``: the same logits as ONE chunk (``chunk_size`` = every row),
  from hidden [8193, 64] and an lm_head [262144, 64], reduction "sum" (the training path,
  dlogits formed in the chunk's buffer in place);
* ``rope``: q [1, 32, 2^20 + 1, 64] in HF's [B, S, H, D] layout (2^31 + 2048 elements) and
  k [1, 8, 2^20 + 1, 64], with upstream gradients of the same layouts.

The references cannot hold fp64 copies of 4 GB tensors, so they are run a block of rows
(positions) at a time -- these ops are row-wise -- and each block of every output and
gradient is judged by the doctrine's ``compare`` (baseline: the reference in fp32 on the
block; exact: in fp64). The kernel always runs on the whole tensor.

Run one case in its own process (a crash of the kernel must not take the caller down):
``python -m parity.large --case cross_entropy [--mutant ID] [--small]``; exit status 0: every
comparison passed, 1: one failed (or the kernel raised), 77: skipped (no CUDA, or too little
free memory), anything else: the process crashed. ``--small`` runs the same code on shapes
the CPU interpreter can afford (``test_large.py`` checks the machinery that way).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = 77
GiB = 2**30


@dataclass(frozen=True)
class Shape:
    """One case's sizes; ``block``: rows (positions) a reference block holds."""
    rows: int
    cols: int
    hidden: int = 0
    heads_q: int = 0
    heads_k: int = 0
    block: int = 256


#: The GPU shapes (each past 2^31 elements in one tensor) and the small CPU ones.
SHAPES = {
    "cross_entropy": (Shape(rows=8193, cols=262144, block=256), Shape(rows=7, cols=37, block=3)),
    "fused_linear_cross_entropy": (Shape(rows=8193, cols=262144, hidden=64, block=256),
                                   Shape(rows=7, cols=37, hidden=5, block=3)),
    "rope": (Shape(rows=2**20 + 1, cols=64, heads_q=32, heads_k=8, block=8192),
             Shape(rows=11, cols=8, heads_q=4, heads_k=2, block=4)),
}


def elements(case: str, shape: Shape) -> int:
    """Elements of the case's largest tensor (the one that must pass 2^31)."""
    if case == "rope":
        return shape.heads_q * shape.rows * shape.cols
    return shape.rows * shape.cols


def bytes_needed(case: str, shape: Shape) -> int:
    """A generous estimate of the device memory a case needs (bf16 tensors, fp64 blocks)."""
    n = elements(case, shape)
    if case == "cross_entropy":
        return 2 * n * 2 + 8 * shape.block * shape.cols * 8 + GiB          # logits, dlogits; fp64 blocks
    if case == "fused_linear_cross_entropy":
        return 2 * n * 2 + 8 * shape.block * shape.cols * 8 + GiB          # the chunk (twice: F.linear's out)
    kv = shape.heads_k * shape.rows * shape.cols
    return 4 * 2 * (n + kv) + 8 * (shape.heads_q + shape.heads_k) * shape.block * shape.cols * 8 + GiB


def _blocks(n: int, block: int):
    for start in range(0, n, block):
        yield start, min(n, start + block)


def _normal(shape, dtype, device, gen, scale: float = 1.0):
    import torch

    out = torch.empty(shape, dtype=dtype, device=device)
    out.normal_(0.0, scale, generator=gen)
    return out


def cross_entropy_case(fn, shape: Shape, device, seed: int = 0) -> list:
    import torch

    from workbench.kernels._tolerance import compare
    from workbench.kernels.cross_entropy import cross_entropy_reference

    dt = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = _normal((shape.rows, shape.cols), dt, device, gen)
    target = torch.randint(0, shape.cols, (shape.rows,), device=device, generator=gen)
    target[::7] = -100  # some rows ignored (not the last: an ignored row reads no logits)
    g = _normal((shape.rows,), torch.float32, device, gen)
    logits.requires_grad_(True)
    loss = fn(logits, target, reduction="none")
    (dx,) = torch.autograd.grad(loss, logits, g)
    logits = logits.detach()
    found = []
    for a, b in _blocks(shape.rows, shape.block):
        outs = {}
        for cd in (torch.float32, torch.float64):
            leaf = logits[a:b].to(cd if cd == torch.float64 else dt).requires_grad_(True)
            lb = cross_entropy_reference(leaf, target[a:b], reduction="none", compute_dtype=cd)
            (db,) = torch.autograd.grad(lb, leaf, g[a:b].to(lb.dtype))
            outs[cd] = (lb, db)
        found.append(compare(f"loss[{a}:{b}]", loss[a:b].detach(), outs[torch.float32][0], outs[torch.float64][0], dt))
        found.append(compare(f"dlogits[{a}:{b}]", dx[a:b], outs[torch.float32][1], outs[torch.float64][1], dt))
    return found


def fused_linear_cross_entropy_case(fn, shape: Shape, device, seed: int = 0) -> list:
    import torch

    from workbench.kernels._tolerance import compare
    from workbench.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy_reference as ref

    dt = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = _normal((shape.rows, shape.hidden), dt, device, gen)
    weight = _normal((shape.cols, shape.hidden), dt, device, gen, shape.hidden ** -0.5)
    target = torch.randint(0, shape.cols, (shape.rows,), device=device, generator=gen)
    target[::7] = -100
    g = torch.tensor(0.75, device=device)
    hidden.requires_grad_(True)
    # One chunk of every row: its logits buffer is the tensor past 2^31 elements.
    loss = fn(hidden, weight, target, reduction="sum", chunk_size=shape.rows)
    (dh,) = torch.autograd.grad(loss, hidden, g)
    hidden = hidden.detach()
    found = []
    totals = {torch.float32: 0.0, torch.float64: 0.0}
    for a, b in _blocks(shape.rows, shape.block):
        grads = {}
        for cd in (torch.float32, torch.float64):
            leaf = (hidden[a:b].clone() if cd == torch.float32 else hidden[a:b].double()).requires_grad_(True)
            # the baseline rounds this block's logits from a GEMM of the block's rows (its own chunk)
            lb = ref(leaf, weight, target[a:b], reduction="sum", chunk_size=b - a, compute_dtype=cd)
            (grads[cd],) = torch.autograd.grad(lb, leaf, g.to(lb.dtype))
            totals[cd] += float(lb.detach().double())
        found.append(compare(f"dhidden[{a}:{b}]", dh[a:b], grads[torch.float32], grads[torch.float64], dt))
    # The loss sums every row: a row whose logits were read from the wrong place moves it.
    found.insert(0, compare("loss (sum)", loss.detach().reshape(1),
                            torch.tensor([totals[torch.float32]], dtype=torch.float32, device=device),
                            torch.tensor([totals[torch.float64]], dtype=torch.float64, device=device), dt))
    return found


def rope_case(fn, shape: Shape, device, seed: int = 0) -> list:
    import torch

    from workbench.kernels._tolerance import compare
    from workbench.kernels.rope import rope_reference

    dt = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(seed)
    seq, d = shape.rows, shape.cols

    def bshd(heads):  # HF's proj(x).view(B, S, H, D).transpose(1, 2)
        return _normal((1, seq, heads, d), dt, device, gen).transpose(1, 2)

    q, k = bshd(shape.heads_q), bshd(shape.heads_k)
    pos = torch.arange(seq, device=device, dtype=torch.float32)
    inv_freq = 1.0 / (10_000.0 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    emb = torch.cat([pos[:, None] * inv_freq] * 2, dim=-1)
    cos, sin = emb.cos().to(dt)[None], emb.sin().to(dt)[None]
    del pos, emb
    dq_out, dk_out = bshd(shape.heads_q), bshd(shape.heads_k)
    q.requires_grad_(True)
    k.requires_grad_(True)
    q_out, k_out = fn(q, k, cos, sin)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (dq_out, dk_out))
    q, k = q.detach(), k.detach()
    q_out, k_out = q_out.detach(), k_out.detach()
    found = []
    for a, b in _blocks(seq, shape.block):
        res = {}
        for cd in (torch.float32, torch.float64):
            cast = cd if cd == torch.float64 else dt
            lq = q[:, :, a:b].to(cast).requires_grad_(True)
            lk = k[:, :, a:b].to(cast).requires_grad_(True)
            oq, ok_ = rope_reference(lq, lk, cos[:, a:b].to(cast), sin[:, a:b].to(cast), compute_dtype=cd)
            gq, gk = torch.autograd.grad((oq, ok_), (lq, lk), (dq_out[:, :, a:b].to(cast), dk_out[:, :, a:b].to(cast)))
            res[cd] = (oq, ok_, gq, gk)
        for i, (name, kern) in enumerate((("q_out", q_out), ("k_out", k_out), ("dq", dq), ("dk", dk))):
            found.append(compare(f"{name}[:, :, {a}:{b}]", kern[:, :, a:b], res[torch.float32][i],
                                 res[torch.float64][i], dt))
    return found


CASES = {"cross_entropy": cross_entropy_case, "fused_linear_cross_entropy": fused_linear_cross_entropy_case,
         "rope": rope_case}


def run(case: str, small: bool, mutant_id: str | None = None) -> int:
    """One case, in this process: the exit status of ``python -m parity.large``."""
    import torch

    from workbench.kernels import get
    from workbench.kernels._harness import default_device

    device = default_device()
    shape = SHAPES[case][1 if small else 0]
    if not small:
        if device.type != "cuda":
            print(f"skip: the {case} 2^31 case needs CUDA")
            return SKIP
        free = torch.cuda.mem_get_info(device)[0]
        need = bytes_needed(case, shape)
        if free < need:
            print(f"skip: the {case} 2^31 case needs about {need / GiB:.1f} GiB free on the GPU, "
                  f"{free / GiB:.1f} GiB are")
            return SKIP
    spec = get(case)
    if mutant_id:
        from .mutants import all_mutants, load

        spec = load(next(m for m in all_mutants() if m.id == mutant_id))
    print(f"{case}: {elements(case, shape)} elements in its largest tensor (2^31 = {2**31}), "
          f"{'mutant ' + mutant_id if mutant_id else 'the kernel'}, on {device}", flush=True)
    try:
        found = CASES[case](spec.fn, shape, device)
    except Exception as err:  # noqa: BLE001 -- the kernel raised (or the device failed): the case fails
        print(f"FAIL: {type(err).__name__}: {err}")
        return 1
    bad = [c for c in found if not c.ok]
    for c in (bad or found[:2] + found[-2:]):
        print(c.line())
    print(f"{len(found) - len(bad)} of {len(found)} comparisons passed")
    return 1 if bad else 0


def run_large_case_in_subprocess(case: str, mutant: str | None = None, small: bool = False,
                                 timeout: float = 1800) -> tuple[int, str]:
    """(exit status, output) of ``python -m parity.large`` for one case; a signal is its
    negative number, a timeout -9."""
    cmd = [sys.executable, "-m", "parity.large", "--case", case] + (["--mutant", mutant] if mutant else []) \
        + (["--small"] if small else [])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        return -9, f"timed out after {timeout:.0f} s\n{err.stdout or ''}{err.stderr or ''}"
    return out.returncode, out.stdout + out.stderr


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity.large", description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), required=True)
    parser.add_argument("--mutant", help="run a planted mutant of parity/mutants instead of the kernel")
    parser.add_argument("--small", action="store_true", help="the CPU-sized shape (checks the machinery)")
    args = parser.parse_args(argv)
    return run(args.case, args.small, args.mutant)


if __name__ == "__main__":
    from . import _profiles  # noqa: F401  (the interpreter switch before triton)

    raise SystemExit(main())
