from . import Mutant

MUTANTS = [
    Mutant("swiglu", "sigmoid_derivative_dropped", "d_gate uses sig(g) alone, dropping the (1 + g(1 - sig)) term",
           old="d_silu = 1.0 + g * (1.0 - sig)", new="d_silu = 1.0"),
    Mutant("swiglu", "d_up_uses_gate", "d_up multiplies dy by gate instead of silu(gate)",
           old="tl.store(DU + idx, (dy * div_f32(g, 1.0 + exp_f32(-g, EXACT), EXACT)).to(DU.dtype.element_ty), mask=mask)",
           new="tl.store(DU + idx, (dy * g).to(DU.dtype.element_ty), mask=mask)"),
    Mutant("swiglu", "up_row_stride_from_gate", "up addressed with gate's row stride (non-contiguous inputs)",
           old="u_off = offset(idx, n_cols, u_stride, CONTIG)",
           new="u_off = offset(idx, n_cols, g_stride, CONTIG)", count=2),
    Mutant("swiglu", "backward_sigmoid_sign_flipped", "the backward's sigmoid computed as 1 / (1 + exp(g))",
           old="sig = div_f32(1.0, 1.0 + exp_f32(-g, EXACT), EXACT)",
           new="sig = div_f32(1.0, 1.0 + exp_f32(g, EXACT), EXACT)"),
    Mutant("swiglu", "dy_assumed_contiguous", "the backward's contiguity check leaves out dy: a strided or expanded "
           "upstream gradient (torch.cat([swiglu(g, u), other], -1)) is read as if dense",
           old="CONTIG=contiguous(n_cols, dh, gate, u_arg), BLOCK=b, **consts)",
           new="CONTIG=contiguous(n_cols, gate, u_arg), BLOCK=b, **consts)", module="_elementwise"),
]
