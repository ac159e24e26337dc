from . import Mutant

MUTANTS = [
    Mutant("lora_mlp", "up_grad_takes_gate_grad", "the up projection's LoRA gradients use d_gate instead of d_up",
           old="for branch, d_b in zip(branches, grads):", new="for branch, d_b in zip(branches, grads[:1] * 2):"),
    Mutant("lora_mlp", "backward_ignores_approximate", "the activation's backward always takes exact GELU",
           old="grads = _act_backward(dh, g[rows], u[rows], activation, approximate,",
           new='grads = _act_backward(dh, g[rows], u[rows], activation, "none",'),
    Mutant("lora_mlp", "dh_blocks_misaligned", "a block of dh rows takes the previous block's upstream gradient",
           old="dh = add_input_grad(None, dy2[rows], wd, dxaT_d[:, rows],",
           new="dh = add_input_grad(None, dy2[max(0, start - step):max(0, start - step) + rows.stop - start], "
               "wd, dxaT_d[:, rows],"),
    Mutant("lora_mlp", "dh_blocks_drop_dropout", "the blocked dh leaves out down's dropout mask",
           old="Ad, None if keep_d is None else keep_d[rows], inv,", new="Ad, None, inv,"),
    Mutant("lora_mlp", "blocked_dB_keeps_last_block", "the blocked dB keeps only the last block's product",
           old="acc.addmm_(d_b.t().to(acc.dtype), xa[rows].to(acc.dtype), alpha=scaling)",
           new="acc.copy_(scaling * (d_b.t().to(acc.dtype) @ xa[rows].to(acc.dtype)))"),
    Mutant("lora_mlp", "blocked_dx_drops_up", "the blocked dX leaves out up's term",
           old="add_input_grad(dx[rows], d_b, W, dxaT_b, A, keep_b, inv, x_dtype)", new="pass"),
    Mutant("lora_mlp", "down_dA_without_dropout", "dAd is taken against h instead of the dropped-out h",
           old="hd = layer_inputs(h, keep_d, inv, lo)[1]", new="hd = h.to(lo)"),
    Mutant("lora_mlp", "shared_dx_adapters_misordered", "dx's one LoRA GEMM (no mask) multiplies the stacked dxa^T "
           "(gate, up) by cat(A) in the other order",
           old="stack_rows((gate.A, up.A))", new="torch.cat((up.A, gate.A))"),
    # dAd from the h that the activation's backward writes over dh (issue #19's fusion):
    Mutant("lora_mlp", "dAd_before_h_written", "dAd is formed from dh's buffer before the activation's backward "
           "has written h over it (dxa_d^T dh)",
           old="""        grads = _act_backward(dh, g[rows], u[rows], activation, approximate, gate is not None, up is not None, lo,
                              h_out=dh if down.need_a else None)
        if down.need_a:  # dh's buffer now holds h (one block: every row)
            dAd = C.empty((dxaT_d.shape[0], inter), lo, dev)
            torch.mm(dxaT_d, dh, out=dAd)
""",
           new="""        if down.need_a:
            dAd = C.empty((dxaT_d.shape[0], inter), lo, dev)
            torch.mm(dxaT_d, dh, out=dAd)
        grads = _act_backward(dh, g[rows], u[rows], activation, approximate, gate is not None, up is not None, lo,
                              h_out=dh if down.need_a else None)
"""),
    Mutant("lora_mlp", "fused_dAd_ignores_down_dropout", "dAd takes the h written over dh under a dropout mask on "
           "down's input too (h, not dropout(h))",
           old="return keep_d is None and g.dtype == lo and", new="return g.dtype == lo and"),
    Mutant("lora_mlp", "swiglu_h_stored_before_dh_read", "the SwiGLU backward writes h over dh before it reads dh "
           "(in place, the gradients then read h)", module="swiglu",
           old="    dy = tl.load(DY + dy_off, mask=mask, other=0.0).to(tl.float32)\n",
           new="    if STORE_H:\n"
               "        tl.store(H + idx, (g / (1.0 + tl.exp(-g)) * u).to(H.dtype.element_ty), mask=mask)\n"
               "    dy = tl.load(DY + dy_off, mask=mask, other=0.0).to(tl.float32)\n"),
    Mutant("lora_mlp", "geglu_h_takes_d_up", "the GeGLU backward writes dy * gelu(g) (d_up) as h, dy for up",
           module="geglu", old="tl.store(H + idx, (_gelu(g, TANH, EXACT_H) * u).to(H.dtype.element_ty), mask=mask)",
           new="tl.store(H + idx, (_gelu(g, TANH, EXACT_H) * dy).to(H.dtype.element_ty), mask=mask)"),
]
