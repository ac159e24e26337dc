import torch

from . import Mutant

K = "fused_linear_cross_entropy"

MUTANTS = [
    Mutant(K, "last_partial_chunk_dropped",
           "the chunk loop stops at the last full chunk: the rows of a partial last chunk are never computed",
           old="for start in range(0, n_rows, chunk):",
           new="for start in range(0, n_rows - n_rows % chunk, chunk):"),
    Mutant(K, "dw_bf16_accumulator",
           "dW accumulated across chunks in bf16 (the accumulator rounded after every chunk's GEMM)",
           old="        acc.addmm_(a, b)\n        return",
           new="        acc.copy_(torch.addmm(acc, a, b).bfloat16())\n        return"),
    Mutant(K, "num_items_in_batch_ignored",
           "num_items_in_batch not passed on: the loss is the plain mean (or sum) instead of sum / num_items",
           old="h2, weight, bias, t2, denom, int(ignore_index)",
           new="h2, weight, bias, t2, None, int(ignore_index)"),
    Mutant(K, "bias_grad_misses_first_chunk",
           "dBias accumulation skips a chunk (the first one)",
           old="    if db_acc is not None:\n        db_acc +=",
           new="    if db_acc is not None and start > 0:\n        db_acc +="),
    Mutant(K, "upstream_scale_skipped",
           "the gradients precomputed in the forward are returned without the upstream scalar "
           "(Liger's grad_output == 1 shortcut taken always)",
           old="_scaled(dh, s, dh.dtype) if need_h", new="dh if need_h"),
    Mutant(K, "z_output_upstream_dropped",
           "the recompute backward ignores the upstream gradient of the returned z-loss output",
           old="has_gz = grad_z is not None and o.z_coef > 0.0", new="has_gz = False"),
    Mutant(K, "per_row_upstream_chunk_offset_missing",
           "reduction='none': every chunk reads the upstream gradients of the first chunk's rows",
           old="else g[start:end]", new="else g[:end - start]"),
    Mutant(K, "recompute_without_bias",
           "the backward recomputes the chunk's logits without the bias (softmax inconsistent with the saved lse)",
           old="F.linear(h_c, weight, bias)    # recomputed", new="F.linear(h_c, weight)    # recomputed"),
    Mutant(K, "fp16_dlogits_in_forward",
           "fp16 forms its gradients in the forward for an upstream of 1, as bf16 does: dlogits of a loss divided "
           "by thousands (num_items_in_batch) are fp16 subnormals, and GradScaler's scale comes too late",
           old="and hidden.dtype != torch.float16)", new=")", dtypes=(torch.float16,)),
]
