import torch

from . import Mutant

MUTANTS = [
    Mutant("layer_norm", "db_not_accumulated", "dB not accumulated across the rows of a program",
           old="db_acc += dy", new="db_acc = dy"),
    Mutant("layer_norm", "dx_mean_term_dropped", "the mean(w * dy) term dropped from dX (one-block path)",
           old="dx = (g - c1 - x_hat * c2) * rstd", new="dx = (g - x_hat * c2) * rstd"),
    Mutant("layer_norm", "variance_without_mean", "variance computed as E[x^2] (mean not subtracted)",
           old="xc = tl.where(mask, x - mean, 0.0)\n        var = tl.sum(xc * xc, axis=0) * inv_n",
           new="xc = tl.where(mask, x - mean, 0.0)\n        var = tl.sum(x * x, axis=0) * inv_n"),
    Mutant("layer_norm", "last_block_mask_off_by_one", "the last block's mask off by one (looped forward)",
           old="            tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)",
           new="            tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=cols < n_cols - 1)"),
    Mutant("layer_norm", "padding_in_variance", "padding lanes not masked out of the centred sum of squares",
           old="xc = tl.where(mask, x - mean, 0.0)\n        var", new="xc = x - mean\n        var"),
    Mutant("layer_norm", "unbiased_variance", "unbiased variance (n - 1) instead of LayerNorm's biased one",
           old="var = tl.sum(acc, axis=0) * inv_n", new="var = tl.sum(acc, axis=0) / (n_cols - 1)"),
    Mutant("layer_norm", "variance_by_cancellation", "the variance formed as E[x^2] - mean^2 (one pass): exact in "
           "real numbers, but it cancels every digit of the spread in fp32 when a row's mean is large against it",
           old="xc = tl.where(mask, x - mean, 0.0)\n        var = tl.sum(xc * xc, axis=0) * inv_n",
           new="xc = tl.where(mask, x - mean, 0.0)\n        var = tl.sum(x * x, axis=0) * inv_n - mean * mean"),
    Mutant("layer_norm", "variance_accumulated_in_input_dtype", "the looped path's centred sum of squares "
           "accumulated in the input dtype: a 16-bit accumulator over the row's blocks (ci's random rows span "
           "at most 20 blocks, and the base suite let it through in bf16)",
           old="acc += xc * xc", new="acc = (acc + xc * xc).to(X.dtype.element_ty).to(tl.float32)",
           dtypes=(torch.bfloat16,)),
]
