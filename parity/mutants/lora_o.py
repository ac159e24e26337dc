import torch

from . import Mutant

#: The building blocks of one LoRA linear live in ``_lora_ops.py``; lora_o, their simplest kernel, judges them.
OPS = "_lora_ops"

MUTANTS = [
    Mutant("lora_o", "scaling_applied_twice", "the forward multiplies the LoRA branch by scaling twice",
           old="y.addmm_(xa, B.t(), alpha=s)", new="y.addmm_(xa, B.t(), alpha=s * s)", module=OPS),
    Mutant("lora_o", "mixed_term_unscaled", "the mixed mode (fp32 x, bf16 layer) adds the LoRA term without "
           "its scaling",
           old="lora = scaled_mm(xa, B.t(), s,", new="lora = scaled_mm(xa, B.t(), 1.0,",
           dtypes=(torch.bfloat16,), module=OPS),
    Mutant("lora_o", "lora_term_replaces_base", "the forward's epilogue overwrites the base output with the LoRA "
           "term (beta = 0) instead of adding to it",
           old="y.addmm_(xa, B.t(), alpha=s)", new="y.addmm_(xa, B.t(), beta=0, alpha=s)", module=OPS),
    Mutant("lora_o", "sum_in_layer_dtype", "the mixed mode (fp32 x, bf16 layer) sums the base output and the LoRA "
           "term in bf16 before returning fp32: an adapter's small first updates are rounded away (the bug of "
           "d1d0b5d, measured in QLoRA training on an H200); only the delta comparison sees it",
           old="tl.store(OUT + idx, round_to(y + lora, OUT.dtype.element_ty), mask=mask)",
           new="tl.store(OUT + idx, round_to(round_to(y + lora, LORA.dtype.element_ty).to(tl.float32), "
               "OUT.dtype.element_ty), mask=mask)",
           dtypes=(torch.bfloat16,), module=OPS),
    Mutant("lora_o", "scaling_missing_in_backward", "the backward of `* scaling` is dropped: dA, dB and dx's "
           "LoRA term are all off by the scaling",
           old="    dA = dB = None\n", new="    dA = dB = None\n    s = 1.0\n", module=OPS),
    Mutant("lora_o", "dxa_from_unscaled_dy", "dA (and dx's LoRA term) use dy instead of scaling * dy: "
           "the wrong factor on the A side only, dB stays right",
           old="scaled_mm(B.t(), dy2.t(), s, out=dxaT)", new="scaled_mm(B.t(), dy2.t(), 1.0, out=dxaT)", module=OPS),
    Mutant("lora_o", "dropout_mask_not_in_dA", "the backward takes dA against x instead of the dropped-out x",
           old="xd2 = branch_input(xs, keep2, inv, lo) if need_a else None",
           new="xd2 = xs.to(lo) if need_a else None"),
    Mutant("lora_o", "dropout_backward_unscaled", "the dropout's backward masks but forgets the 1 / (1 - p)",
           old="t = round_to(tl.where(keep != 0, t * scale, 0.0), DX.dtype.element_ty).to(tl.float32)",
           new="t = round_to(tl.where(keep != 0, t, 0.0), DX.dtype.element_ty).to(tl.float32)", module=OPS),
    Mutant("lora_o", "dropout_ignores_row_stride", "the dropout kernel reads a row-strided x as if contiguous",
           old="x_off = offset(idx, n_cols, x_stride, CONTIG)", new="x_off = idx", module=OPS),
    Mutant("lora_o", "dx_lora_term_summed_in_layer_dtype", "mixed mode (fp32 x, bf16 layer): dX's LoRA term added "
           "to the base term in the layer's dtype, where autograd sums the two 16-bit gradients in fp32: a small "
           "adapter's term is rounded away while dX stays within a bf16 roundoff; only the gradient delta sees it",
           old="tl.store(DX + idx, round_to(dx + t, DX.dtype.element_ty), mask=mask)",
           new="tl.store(DX + idx, round_to(round_to(dx + t, T.dtype.element_ty).to(tl.float32), DX.dtype.element_ty), "
               "mask=mask)",
           dtypes=(torch.bfloat16,), module=OPS),
    Mutant("lora_o", "dy_read_as_contiguous", "the backward reads dy's storage as a dense [rows, out] array: a "
           "strided, transposed or expanded upstream gradient is read wrong",
           old='dy2 = C.rows_view(op, "dy", dy).to(lo)',
           new="dy2 = dy.as_strided((dy.numel() // out, out), (out, 1)).to(lo)"),
    Mutant("lora_o", "dx_lora_term_replaces_base", "dX's epilogue overwrites the base term dy W with the LoRA term "
           "(beta = 0) instead of adding to it",
           old="dx.addmm_(dxaT.t(), A)", new="dx.addmm_(dxaT.t(), A, beta=0)", module=OPS),
]
