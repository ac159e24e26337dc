from . import Mutant

MUTANTS = [
    Mutant("lora_o", "scaling_applied_twice", "the forward multiplies the LoRA branch by scaling twice",
           old="lora = _to(lora * s, Y.dtype.element_ty).to(tl.float32)",
           new="lora = _to(lora * s * s, Y.dtype.element_ty).to(tl.float32)"),
    Mutant("lora_o", "scaling_missing_in_backward", "the backward of `* scaling` is dropped: dA, dB and dx's "
           "LoRA term are all off by the scaling",
           old="tl.store(DS + idx, _to(dy * s, DS.dtype.element_ty), mask=mask)",
           new="tl.store(DS + idx, _to(dy, DS.dtype.element_ty), mask=mask)"),
    Mutant("lora_o", "dxa_from_unscaled_dy", "dA (and dx's LoRA term) use dy instead of scaling * dy: "
           "the wrong factor on the A side only, dB stays right",
           old="torch.mm(ds, B, out=dxa)", new="torch.mm(dy2, B, out=dxa)"),
    Mutant("lora_o", "dropout_mask_not_in_dA", "the backward takes dA against x instead of the dropped-out x",
           old="xd2 = dropout_apply(x2, keep2, inv) if need_a else None",
           new="xd2 = x2 if need_a else None"),
    Mutant("lora_o", "dropout_backward_unscaled", "the dropout's backward masks but forgets the 1 / (1 - p)",
           old="t = _to(tl.where(keep != 0, t * scale, 0.0), DX.dtype.element_ty).to(tl.float32)",
           new="t = _to(tl.where(keep != 0, t, 0.0), DX.dtype.element_ty).to(tl.float32)"),
    Mutant("lora_o", "dropout_ignores_row_stride", "the dropout kernel reads a row-strided x as if contiguous",
           old="x_off = _offset(idx, n_cols, x_stride, CONTIG)", new="x_off = idx"),
]
