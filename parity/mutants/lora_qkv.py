import torch

from . import Mutant

OPS = "_lora_ops"

MUTANTS = [
    Mutant("lora_qkv", "dx_overwritten_per_projection", "dx is assigned, not accumulated, per projection: only "
           "v's contribution survives",
           old="dx = add_input_grad(dx, dy2, w, None if fused else dxaT_i, A, keeps[i], inv, x_dtype)",
           new="dx = add_input_grad(None, dy2, w, None if fused else dxaT_i, A, keeps[i], inv, x_dtype)"),
    Mutant("lora_qkv", "one_mask_for_all_projections", "q's dropout mask reused for k and v (PEFT draws one "
           "per projection)",
           old="tuple(L.rows2(keep[i], d_in) for i in range(3))",
           new="tuple(L.rows2(keep[0], d_in) for i in range(3))",
           count=2),
    Mutant("lora_qkv", "bias_dropped", "the frozen q/k/v biases (Qwen2) are not added",
           old="y, xa = lora_forward(xc, xd2, w, A, B, scaling, bias, out_dtype=x.dtype, xa=xas[i])",
           new="y, xa = lora_forward(xc, xd2, w, A, B, scaling, out_dtype=x.dtype, xa=xas[i])"),
    Mutant("lora_qkv", "dx_accumulated_in_layer_dtype", "mixed mode: dX of q, k and v accumulated in the layer's "
           "bf16, where autograd sums the six 16-bit gradients in fp32: the LoRA terms of a small adapter are "
           "rounded away while dX stays within bf16 roundoffs; only the gradient delta sees it",
           old="dx = add_input_grad(dx, dy2, w, None if fused else dxaT_i, A, keeps[i], inv, x_dtype)",
           new="dx = add_input_grad(dx, dy2, w, None if fused else dxaT_i, A, keeps[i], inv, lo)",
           dtypes=(torch.bfloat16,)),
    Mutant("lora_qkv", "dx_base_term_replaces_earlier", "a projection's base term dy W overwrites (beta = 0) the "
           "input gradient the earlier projections accumulated, in the epilogue that should add to it",
           old="dx.addmm_(dy2, w)", new="dx.addmm_(dy2, w, beta=0)", module=OPS),
    # The fused path (no dropout mask): the three projections' LoRA-A products, dA and dx's LoRA
    # terms are each one GEMM over stacked adapters, and each projection reads its own rows or
    # columns of the stack. Equal ranks (as drawn) keep every shape right when the order is wrong.
    Mutant("lora_qkv", "shared_xa_columns_misordered", "the forward's stacked xa = x cat(A)^T is split in the "
           "wrong order: q's LoRA epilogue reads v's columns",
           old="return A_all, [xa_all[:, sl] for sl in rank_slices([A.shape[0] for A in As])]",
           new="return A_all, [xa_all[:, sl] for sl in rank_slices([A.shape[0] for A in As])[::-1]]", module=OPS),
    Mutant("lora_qkv", "shared_dA_rows_misordered", "the one dA GEMM's rows are handed back in the wrong order: "
           "dAq is v's",
           old="return [dA_all[sl] if nd else None for sl, nd in zip(slices, need)]",
           new="return [dA_all[sl] if nd else None for sl, nd in zip(slices[::-1], need)]", module=OPS),
    Mutant("lora_qkv", "stacked_view_of_non_neighbours", "the A's are stacked as a view of their buffer "
           "whenever they share one, neighbours or not (adapters interleaved A, B, A, B in one buffer)",
           old="and t.untyped_storage().data_ptr() == storage and t.data_ptr() == at):",
           new="and t.untyped_storage().data_ptr() == storage):", module=OPS),
    Mutant("lora_qkv", "shared_dx_adapters_misordered", "dx's one LoRA GEMM multiplies the stacked dxa^T (q, k, v) "
           "by cat(A) in another order (k, q, v)",
           old="stack_rows(saved[4 * i] for i in range(3))", new="torch.cat([saved[4 * i] for i in (1, 0, 2)])"),
]
