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
           old="acc.addmm_(d_b.t().float(), xa[rows].float(), alpha=scaling)",
           new="acc.copy_(scaling * (d_b.t().float() @ xa[rows].float()))"),
    Mutant("lora_mlp", "blocked_dx_drops_up", "the blocked dX leaves out up's term",
           old="add_input_grad(dx[rows], d_b, W, dxaT_b, A, keep_b, inv, x_dtype)", new="pass"),
    Mutant("lora_mlp", "down_dA_without_dropout", "dAd is taken against h instead of the dropped-out h",
           old="hd = layer_inputs(h, keep_d, inv, lo)[1]", new="hd = h.to(lo)"),
    Mutant("lora_mlp", "shared_dx_adapters_misordered", "dx's one LoRA GEMM (no mask) multiplies the stacked dxa^T "
           "(gate, up) by cat(A) in the other order",
           old="torch.cat((gate.A, up.A))", new="torch.cat((up.A, gate.A))"),
]
