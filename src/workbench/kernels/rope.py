"""Rotary position embedding, exactly as HF transformers' ``apply_rotary_pos_emb``.

``rotate_half`` convention: with ``R = cos.shape[-1]`` the rotary width, x1 =
x[..., :R/2], x2 = x[..., R/2:R], and

    y[..., :R] = x[..., :R] * cos + cat(-x2, x1) * sin,    y[..., R:] = x[..., R:]

(partial rotary: the dims past R pass through unchanged). Written out per half,
with cos = [c1, c2] and sin = [s1, s2] (HF's tables have c1 == c2, s1 == s2, but
nothing here assumes it):

    y1 = x1 * c1 - x2 * s1,    y2 = x2 * c2 + x1 * s2.

Backward (the transposed map, i.e. the rotation by -sin):

    dx1 = dy1 * c1 + dy2 * s2,    dx2 = dy2 * c2 - dy1 * s1.

cos/sin come either already gathered by position ([B or 1, S, R], as HF's
rotary embedding module returns them) or as tables [max_pos, R] with
``position_ids`` [B, S] naming the row of each token. One launch does q and k
(forward, and dq and dk in the backward): program (i, j) rotates a block of
positions of one batch row (i) for one block of heads (j, over q's head blocks
then k's), as 3-D [positions, heads, R/2] tiles of about _TILE elements.

Outputs and gradients take the memory layout of q and k (HF's q/k are [B, S, H, D]
buffers seen as [B, H, S, D]); upstream gradients are read in whatever strides
they arrive with.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from hypothesis import strategies as st

from . import _common as C
from . import _strategies as S
from ._harness import maybe_strided, randn
from ._registry import Example, Inputs, KernelSpec, Limits

#: Elements of one [positions, heads, columns] tile, and heads per program, on the GPU.
#: Each program rotates one block of heads (of q, or of k) for a block of positions, so a
#: launch has (q + k head blocks) x (position blocks) independent programs, each a load
#: then a store. 4 heads x 16 positions x 64 columns with 4 warps came out best on an H200
#: (Llama-3.1-8B shapes, bf16, CUDA-graph timing; HF's [B, S, H, D] views, contiguous
#: [B, H, S, D], position_ids, and head_dim 64 alike): forward 0.044 ms against 0.052 for
#: 8 heads, 0.059 for 32 heads x 4 positions, and 0.060 for the earlier kernel, whose program
#: did every head of q and then of k for 4 positions. The interpreter's cost is programs x ops,
#: so there a program takes all heads of whole short sequences.
_TILE = 32768 if C.INTERPRET else 4096
_HEADS = 64 if C.INTERPRET else 4


# --------------------------------------------------------------------------- Triton
@triton.jit
def _rope_heads(X, Y, x_rows, y_rows, x_sh, y_sh, heads, n_heads, cos_rows, sin_rows, smask, half, head_dim,
                BWD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    """Rotate heads ``heads`` [BLOCK_H] of a block of (b, s) rows of X into Y, as
    [BLOCK_S, BLOCK_H, columns] tiles; then copy the pass-through columns [R, D).

    ``x_rows``/``y_rows`` [BLOCK_S] are the rows' offsets, ``cos_rows``/``sin_rows``
    [BLOCK_S] pointers to their cos/sin rows."""
    h64 = heads.to(tl.int64)[None, :, None]
    rmask = smask[:, None, None] & (heads < n_heads)[None, :, None]
    x_base = X + x_rows[:, None, None] + h64 * x_sh
    y_base = Y + y_rows[:, None, None] + h64 * y_sh
    for start in range(0, half, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        cmask = cols < half
        cs_mask = smask[:, None] & cmask[None, :]
        c1 = tl.load(cos_rows[:, None] + cols[None, :], mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
        c2 = tl.load(cos_rows[:, None] + half + cols[None, :], mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
        s1 = tl.load(sin_rows[:, None] + cols[None, :], mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
        s2 = tl.load(sin_rows[:, None] + half + cols[None, :], mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
        mask = rmask & cmask[None, None, :]
        xp = x_base + cols[None, None, :]
        x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + half, mask=mask, other=0.0).to(tl.float32)
        if BWD:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        yp = y_base + cols[None, None, :]
        tl.store(yp, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(yp + half, y2.to(Y.dtype.element_ty), mask=mask)
    # Partial rotary: columns [R, D) pass through unchanged (the gradient too).
    for start in range(2 * half, head_dim, BLOCK_P):
        cols = start + tl.arange(0, BLOCK_P)
        mask = rmask & (cols < head_dim)[None, None, :]
        x = tl.load(x_base + cols[None, None, :], mask=mask, other=0.0)
        tl.store(y_base + cols[None, None, :], x, mask=mask)


@triton.jit
def _rope_kernel(Q, K, COS, SIN, POS, QO, KO,
                 q_sb, q_sh, q_ss, k_sb, k_sh, k_ss,
                 qo_sb, qo_sh, qo_ss, ko_sb, ko_sh, ko_ss,
                 c_sb, c_ss, s_sb, s_ss, p_sb, p_ss,
                 seq, n_seq_blocks, n_q_blocks, n_q_heads, n_k_heads, half, head_dim,
                 HAS_POS: tl.constexpr, BWD: tl.constexpr,
                 BLOCK_S: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                 BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    # Program (i, j): batch row b and positions [s0, s0 + BLOCK_S) from i; from j, head
    # block j of q (j < n_q_blocks) or head block j - n_q_blocks of k.
    pid = tl.program_id(0).to(tl.int64)
    hblock = tl.program_id(1).to(tl.int64)  # its products in int64, as every offset (parity/int64_offsets.py)
    b = pid // n_seq_blocks
    srow = (pid % n_seq_blocks) * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    smask = srow < seq
    if HAS_POS:
        p = tl.load(POS + b * p_sb + srow * p_ss, mask=smask, other=0).to(tl.int64)
    else:
        p = srow
    cos_rows = COS + b * c_sb + p * c_ss
    sin_rows = SIN + b * s_sb + p * s_ss
    # (No variable is assigned in both branches: Triton would require one type, and
    # q's and k's head blocks may differ in size.)
    if hblock < n_q_blocks:
        _rope_heads(Q, QO, b * q_sb + srow * q_ss, b * qo_sb + srow * qo_ss, q_sh, qo_sh,
                    hblock * BLOCK_HQ + tl.arange(0, BLOCK_HQ), n_q_heads,
                    cos_rows, sin_rows, smask, half, head_dim, BWD=BWD, BLOCK=BLOCK, BLOCK_P=BLOCK_P)
    else:
        _rope_heads(K, KO, b * k_sb + srow * k_ss, b * ko_sb + srow * ko_ss, k_sh, ko_sh,
                    (hblock - n_q_blocks) * BLOCK_HK + tl.arange(0, BLOCK_HK), n_k_heads,
                    cos_rows, sin_rows, smask, half, head_dim, BWD=BWD, BLOCK=BLOCK, BLOCK_P=BLOCK_P)


# --------------------------------------------------------------------------- launchers
def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has unit stride (any other strides are fine), else a copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _dim_order(t: torch.Tensor) -> tuple[int, ...]:
    """The order, outermost first, of ``t``'s [B, H, S] dims in memory (by stride; ties keep
    dim order), then D, which stays innermost (the kernel needs its unit stride). For HF's
    ``proj(x).view(B, S, H, D).transpose(1, 2)`` this is (0, 2, 1, 3)."""
    return (*sorted(range(3), key=lambda d: (-t.stride(d), d)), 3)


def _empty_in_order(shape, order: tuple[int, ...], dtype, device) -> torch.Tensor:
    """A dense tensor of ``shape`` laid out in memory in dim order ``order`` (like
    ``torch.empty_like``'s preserve_format; poisoned under the parity suite)."""
    buf = C.empty([shape[d] for d in order], dtype, device)
    return buf.permute(*sorted(range(len(order)), key=order.__getitem__))


def _blocks(seq: int, half: int, head_dim: int, n_q: int, n_k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_S, BLOCK_HQ, BLOCK_HK, BLOCK, BLOCK_P): [positions, heads, columns] tiles of about
    _TILE elements, at most _HEADS heads; BLOCK spans the rotary half R/2, BLOCK_P the
    pass-through dims D - R."""
    forced = C.forced()
    if forced is not None:
        # Forced small tiles: 4 positions x 2 heads, so every loop and mask runs.
        return 4, 2, 2, int(forced), int(forced)
    block = C.block_for(half, cap=128)
    block_p = C.block_for(head_dim - 2 * half, cap=128)
    block_hq = min(C.next_pow2(n_q), _HEADS)
    block_hk = min(C.next_pow2(n_k), _HEADS)
    block_s = min(C.next_pow2(seq), max(1, _TILE // (max(block_hq, block_hk) * max(block, block_p))))
    return block_s, block_hq, block_hk, block, block_p


def _launch(x_q, x_k, y_q, y_k, cos, sin, pos, half, bwd):
    """One launch over all (b, s) rows and all heads of q and k; ``x_*``/``y_*`` are
    [B, H, S, D] of any strides with a unit last stride (None: skip that tensor)."""
    ref = x_q if x_q is not None else x_k
    n_b, _, seq, head_dim = ref.shape
    if n_b * seq == 0:
        return
    n_q = x_q.shape[1] if x_q is not None else 0
    n_k = x_k.shape[1] if x_k is not None else 0
    block_s, block_hq, block_hk, block, block_p = _blocks(seq, half, head_dim, n_q, n_k)
    n_seq_blocks = C.cdiv(seq, block_s)
    n_q_blocks, n_k_blocks = C.cdiv(n_q, block_hq), C.cdiv(n_k, block_hk)
    if n_q_blocks + n_k_blocks == 0:
        return

    def strides(t):
        return (t.stride(0), t.stride(1), t.stride(2)) if t is not None else (0, 0, 0)

    if pos is not None:
        c_str = (0, cos.stride(0))
        s_str = (0, sin.stride(0))
        p_str = (pos.stride(0), pos.stride(1))
    else:
        c_str = (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1))
        s_str = (sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(1))
        p_str = (0, 0)
    _rope_kernel[(n_b * n_seq_blocks, n_q_blocks + n_k_blocks)](
        x_q if x_q is not None else x_k, x_k if x_k is not None else x_q, cos, sin,
        pos if pos is not None else cos,
        y_q if y_q is not None else y_k, y_k if y_k is not None else y_q,
        *strides(x_q), *strides(x_k), *strides(y_q), *strides(y_k),
        *c_str, *s_str, *p_str,
        seq, n_seq_blocks, n_q_blocks, n_q, n_k, half, head_dim,
        HAS_POS=pos is not None, BWD=bwd,
        BLOCK_S=block_s, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK=block, BLOCK_P=block_p,
        num_warps=8 if block_s * max(block_hq, block_hk) * block >= 8192 else 4)


class _RoPE(torch.autograd.Function):
    """Outputs and input gradients are allocated in the memory layout of q and k (HF's
    q/k are [B, S, H, D] buffers seen as [B, H, S, D]). Contiguous [B, H, S, D] outputs
    would make every consumer pay a copy: AccumulateGrad clones a gradient whose strides
    differ from its leaf's, and HF's ``.view(B, S, H, D)`` backward reshapes one. Upstream
    gradients are read in whatever layout they arrive (unit last stride: no copy)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids):
        q, k = _unit_last(q), _unit_last(k)
        cos, sin = _unit_last(cos), _unit_last(sin)
        half = cos.shape[-1] // 2
        ctx.q_order, ctx.k_order = _dim_order(q), _dim_order(k)
        q_out = _empty_in_order(q.shape, ctx.q_order, q.dtype, q.device)
        k_out = _empty_in_order(k.shape, ctx.k_order, k.dtype, k.device)
        _launch(q, k, q_out, k_out, cos, sin, position_ids, half, bwd=False)
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.half = half
        # An output nobody differentiates arrives as None, not as a materialized zero tensor.
        ctx.set_materialize_grads(False)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin, position_ids = ctx.saved_tensors
        # No upstream gradient: a zero input gradient, which None stands for.
        dq_out = _unit_last(dq_out) if ctx.needs_input_grad[0] and dq_out is not None else None
        dk_out = _unit_last(dk_out) if ctx.needs_input_grad[1] and dk_out is not None else None
        dq = dk = None
        if dq_out is not None:
            dq = _empty_in_order(dq_out.shape, ctx.q_order, dq_out.dtype, dq_out.device)
        if dk_out is not None:
            dk = _empty_in_order(dk_out.shape, ctx.k_order, dk_out.dtype, dk_out.device)
        if dq is not None or dk is not None:
            # dq and dk in one launch, written in q's and k's layouts.
            _launch(dq_out, dk_out, dq, dk, cos, sin, position_ids, ctx.half, bwd=True)
        return dq, dk, None, None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's ``apply_rotary_pos_emb(q, k, cos, sin)`` with ``unsqueeze_dim=1``.

    q [B, Hq, S, D] and k [B, Hk, S, D] (any strides; GQA head counts allowed).
    Without ``position_ids``: cos/sin are [B or 1, S, R], already gathered by
    position. With ``position_ids`` [B, S] (integer): cos/sin are tables
    [max_pos, R] and token (b, s) uses row ``position_ids[b, s]`` (not range
    checked). R (even, <= D) is the rotary width; dims past R pass through.
    Returns new tensors (q_out, k_out) of q's and k's shapes and dtype.
    """
    op = "rope"
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        C.check_float(op, name, t)
    C.check_same_dtype(op, q=q, k=k, cos=cos, sin=sin)
    C.check_device(op, q, k, cos, sin, position_ids)
    if q.dim() != 4 or k.dim() != 4:
        raise C.KernelInputError(f"{op}: q and k must be 4-D [B, H, S, D], got shapes {tuple(q.shape)} "
                                 f"and {tuple(k.shape)}.")
    n_b, _, seq, head_dim = q.shape
    C.check_shape(op, "k", k, (n_b, k.shape[1], seq, head_dim))
    C.check_shape(op, "sin", sin, tuple(cos.shape))
    rot = cos.shape[-1] if cos.dim() else 0
    if rot % 2 or not 0 < rot <= head_dim:
        raise C.KernelInputError(f"{op}: the rotary width cos.shape[-1] must be even and in [2, head_dim="
                                 f"{head_dim}], got {rot}.")
    if position_ids is None:
        if cos.dim() != 3 or cos.shape[0] not in (1, n_b) or cos.shape[1] != seq:
            raise C.KernelInputError(f"{op}: without position_ids, cos/sin must be [B or 1, S, R] = "
                                     f"[{n_b} or 1, {seq}, {rot}], got {tuple(cos.shape)}.")
    else:
        if not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in (torch.int64, torch.int32):
            raise C.KernelInputError(f"{op}: position_ids must be an int64 (or int32) tensor.")
        C.check_shape(op, "position_ids", position_ids, (n_b, seq))
        if cos.dim() != 2:
            raise C.KernelInputError(f"{op}: with position_ids, cos/sin must be tables [max_pos, R], got "
                                     f"shape {tuple(cos.shape)}.")
    return _RoPE.apply(q, k, cos.detach(), sin.detach(), position_ids)


# --------------------------------------------------------------------------- reference
def _rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q, k, cos, sin, position_ids=None, compute_dtype=torch.float32):
    """HF's ``apply_rotary_pos_emb`` (partial rotary as its partial-rotary families
    do it), computed in ``compute_dtype`` (fp64 for the exact pass)."""
    cos, sin = cos.detach(), sin.detach()
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]
    cos = cos.to(compute_dtype).unsqueeze(1)
    sin = sin.to(compute_dtype).unsqueeze(1)
    rot = cos.shape[-1]

    def apply(x):
        h = x.to(compute_dtype)
        h_rot, h_pass = h[..., :rot], h[..., rot:]
        h_rot = h_rot * cos + _rotate_half(h_rot) * sin
        return torch.cat((h_rot, h_pass), dim=-1).to(x.dtype)

    return apply(q), apply(k)


# --------------------------------------------------------------------------- registry
@st.composite
def _params(draw, limits: Limits) -> dict:
    head_dim = draw(S.even_dim(2, limits.max_head_dim))
    partial = draw(st.sampled_from([False, False, True]))
    rot = draw(S.even_dim(2, head_dim)) if partial else head_dim
    n_k = draw(S.dim(1, limits.max_heads))
    group = draw(st.sampled_from([d for d in range(1, limits.max_heads // n_k + 1)]))
    batch = draw(st.sampled_from([2, limits.max_batch, 1, 3]).filter(lambda b: b <= limits.max_batch))
    # Exposing values first: hypothesis draws the first entry of a sampled_from most often.
    form = draw(st.sampled_from(["gathered", "table"]))
    return {
        "batch": batch, "seq": draw(S.dim(1, limits.max_seq)),
        "heads_k": n_k, "heads_q": n_k * group, "head_dim": head_dim, "rot": rot,
        "form": form,
        # gathered form: cos/sin batch 1 (shared positions) or B (per-row positions).
        "cos_batch": draw(st.sampled_from([batch, 1])) if form == "gathered" else None,
        "positions": draw(st.sampled_from(["random", "offsets", "random", "arange"])),
        "max_pos": draw(st.sampled_from([None, 64, 4096])),
        # rope: HF's cos/sin tables (cat(freqs, freqs)); scaled: times an attention
        # scaling (YaRN-like, |cos| > 1); random: unrelated halves (c1 != c2).
        "tables": draw(st.sampled_from(["rope", "rope", "scaled", "random"])),
        "theta": draw(st.sampled_from([10_000.0, 500_000.0, 10.0])),
        "q_layout": draw(st.sampled_from(["bhsd", "bshd", "bshd"])),
        "k_layout": draw(st.sampled_from(["bhsd", "bshd", "bshd"])),
        "strided": draw(st.booleans()),
        "scale": draw(S.scale()),
        "grad_q": draw(st.sampled_from([True, True, False])),
        "grad_k": draw(st.sampled_from([True, True, False])),
        "_block": draw(S.block(limits)),
    }


def _positions(p: dict, gen) -> tuple[torch.Tensor, int]:
    """position_ids [B, S] and the table length they index."""
    n_b, seq = p["batch"], p["seq"]
    max_pos = max(p["max_pos"] or seq, seq + n_b + 1)
    if p["positions"] == "arange":
        pos = torch.arange(seq).expand(n_b, seq)
    elif p["positions"] == "offsets":
        # Left padding / packed rows: each row starts at its own offset.
        offsets = torch.randint(0, max_pos - seq + 1, (n_b, 1), generator=gen)
        pos = offsets + torch.arange(seq)
    else:
        pos = torch.randint(0, max_pos, (n_b, seq), generator=gen)
    return pos.contiguous().to(torch.int64), max_pos


def _tables(p: dict, positions: torch.Tensor, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [..., R] in fp32 for the given positions (any shape)."""
    rot = p["rot"]
    if p["tables"] == "random":
        shape = (*positions.shape, rot)
        return (torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
    inv_freq = 1.0 / (p["theta"] ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    factor = 1.0 + torch.rand((), generator=gen).item() if p["tables"] == "scaled" else 1.0
    return emb.cos() * factor, emb.sin() * factor


def _layout(shape_bhsd, layout, strided, dtype, device, gen, scale):
    n_b, n_h, seq, d = shape_bhsd
    if layout == "bshd":
        # HF: proj(x).view(B, S, H, D).transpose(1, 2).
        x = maybe_strided(randn((n_b, seq, n_h, d), dtype, device, gen, scale), strided, gen)
        return x.transpose(1, 2)
    return maybe_strided(randn((n_b, n_h, seq, d), dtype, device, gen, scale), strided, gen)


def _make_inputs(p: dict, dtype, device, gen) -> Inputs:
    n_b, seq, d = p["batch"], p["seq"], p["head_dim"]
    q = _layout((n_b, p["heads_q"], seq, d), p["q_layout"], p["strided"], dtype, device, gen, p["scale"])
    k = _layout((n_b, p["heads_k"], seq, d), p["k_layout"], p["strided"], dtype, device, gen, p["scale"])
    pos, max_pos = _positions(p, gen)
    if p["form"] == "table":
        cos, sin = _tables(p, torch.arange(max_pos), gen)
        position_ids = pos.to(device)
    else:
        cos, sin = _tables(p, pos[: p["cos_batch"]], gen)
        position_ids = None
    grads = tuple(n for n, on in (("q", p["grad_q"]), ("k", p["grad_k"])) if on)
    return Inputs({"q": q, "k": k, "cos": cos.to(dtype).to(device), "sin": sin.to(dtype).to(device),
                   "position_ids": position_ids}, {}, grads)


#: Cases a mutant once survived random draws with (parity/README.md, "Mutation self-test"):
#: taken on every run. Partial rotary (the pass-through dims' gradient) with gathered cos/sin
#: of one row per batch row (indexed by batch, not shared).
EXAMPLES = (
    Example({"batch": 2, "seq": 5, "heads_k": 2, "heads_q": 4, "head_dim": 16, "rot": 8, "form": "gathered",
             "cos_batch": 2, "positions": "random", "max_pos": 64, "tables": "rope", "theta": 10_000.0,
             "q_layout": "bshd", "k_layout": "bhsd", "strided": False, "scale": 1.0, "grad_q": True,
             "grad_k": True, "_block": None},
            "partial rotary (8 of 16 dims) with per-row gathered cos/sin: the pass-through dims' gradient, and "
            "cos/sin read by batch row", dtypes=(torch.float32,)),
)

SPEC = KernelSpec(
    name="rope",
    fn=rope,
    reference=rope_reference,
    params=_params,
    make_inputs=_make_inputs,
    examples=EXAMPLES,
    outputs=("q_out", "k_out"),
    grads=("q", "k"),
    options=("position_ids (tables [max_pos, R]) or gathered cos/sin [B|1, S, R]",
             "partial rotary R <= D", "GQA Hq != Hk", "strided q/k (HF's transposed view)"),
    summary="HF apply_rotary_pos_emb (rotate_half) on q and k in one launch, with position_ids gather "
            "and partial rotary; backward rotates by -sin.",
)
