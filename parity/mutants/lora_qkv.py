import torch

from . import Mutant

OPS = "_lora_ops"

MUTANTS = [
    Mutant("lora_qkv", "dx_overwritten_per_projection", "dx is assigned, not accumulated, per projection: only "
           "v's contribution survives",
           old="dx = add_input_grad(dx, dy2, w, dxaT, A, keeps[i], inv, x_dtype)",
           new="dx = add_input_grad(None, dy2, w, dxaT, A, keeps[i], inv, x_dtype)"),
    Mutant("lora_qkv", "one_mask_for_all_projections", "q's dropout mask reused for k and v (PEFT draws one "
           "per projection)",
           old="tuple(L.rows2(keep[i], d_in) for i in range(3))",
           new="tuple(L.rows2(keep[0], d_in) for i in range(3))",
           count=2),
    Mutant("lora_qkv", "bias_dropped", "the frozen q/k/v biases (Qwen2) are not added",
           old="y, xa = lora_forward(xc, xd2, w, A, B, scaling, bias, out_dtype=x.dtype)",
           new="y, xa = lora_forward(xc, xd2, w, A, B, scaling, out_dtype=x.dtype)"),
    Mutant("lora_qkv", "dx_accumulated_in_layer_dtype", "mixed mode: dX of q, k and v accumulated in the layer's "
           "bf16, where autograd sums the six 16-bit gradients in fp32: the LoRA terms of a small adapter are "
           "rounded away while dX stays within bf16 roundoffs; only the gradient delta sees it",
           old="dx = add_input_grad(dx, dy2, w, dxaT, A, keeps[i], inv, x_dtype)",
           new="dx = add_input_grad(dx, dy2, w, dxaT, A, keeps[i], inv, lo)", dtypes=(torch.bfloat16,)),
    Mutant("lora_qkv", "dx_base_term_replaces_earlier", "a projection's base term dy W overwrites (beta = 0) the "
           "input gradient the earlier projections accumulated, in the epilogue that should add to it",
           old="dx.addmm_(dy2, w)", new="dx.addmm_(dy2, w, beta=0)", module=OPS),
]
