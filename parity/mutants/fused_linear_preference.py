import torch

from . import Mutant

K = "fused_linear_preference"

MUTANTS = [
    Mutant(K, "rejected_logratio_sign_flipped",
           "DPO: the rejected log-ratio taken as ref - policy (a wrong sign on the rejected side)",
           old="rejected_ratio = rejected - ref_rejected_logps.float()",
           new="rejected_ratio = ref_rejected_logps.float() - rejected"),
    Mutant(K, "backward_chunk_misses_its_last_row",
           "the backward's chunk boundary off by one: each chunk's last row gets no gradient",
           old="            idx = rows[start:end]\n", new="            idx = rows[start:end - 1]\n"),
    Mutant(K, "gradient_reads_ignored_positions",
           "ignore_index not masked in the gradient: the backward reads the upstream of the first n positions, "
           "ignored ones included, instead of the scored rows'",
           old="g = grad_logp.float().index_select(0, rows).neg_()", new="g = grad_logp.float()[:n_scored].neg_()"),
    Mutant(K, "prompt_logps_in_the_sums",
           "ORPO: the log-probs of the positions scored only by the NLL (the prompt) are summed into the "
           "sequences' log-probs (the labels' mask not applied)",
           old="sums = torch.where(scored, logp, 0.0).sum(-1)", new="sums = logp.sum(-1)"),
    Mutant(K, "orpo_beta_missing",
           "ORPO: the odds-ratio term not weighted by beta (its gradient too)",
           old="loss = nll - beta * F.logsigmoid(log_odds).mean()", new="loss = nll - F.logsigmoid(log_odds).mean()"),
    Mutant(K, "label_smoothing_term_sign",
           "conservative DPO: the flipped-label term added with the wrong sign",
           old="losses - label_smoothing * F.logsigmoid(-z)", new="losses + label_smoothing * F.logsigmoid(-z)"),
    Mutant(K, "dw_16bit_accumulator",
           "dW accumulated across chunks in the activation dtype (bf16): the accumulator rounded after every "
           "chunk's GEMM, in the shared addmm_fp32 (its CPU path)",
           old="    acc.addmm_(a.float(), b.float())", new="    acc.copy_(torch.addmm(acc.to(a.dtype), a, b))",
           module="fused_linear_cross_entropy", dtypes=(torch.bfloat16,), devices=("cpu",)),
    Mutant(K, "dw_16bit_accumulator_cublas",
           "the same bug in addmm_fp32's GPU path (cuBLAS with an fp32 output): the accumulator rounded to "
           "bf16 after every chunk's GEMM",
           old="torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)",
           new="acc.copy_(torch.addmm(acc.to(a.dtype), a, b))",
           module="fused_linear_cross_entropy", dtypes=(torch.bfloat16,), devices=("cuda",)),
]
