import torch

from . import Mutant

MUTANTS = [
    Mutant("rms_norm", "gemma_offset_dropped", "Gemma's (1 + w) offset dropped in the forward",
           old="w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset\n        x_hat = x * rstd",
           new="w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)\n        x_hat = x * rstd"),
    Mutant("rms_norm", "dw_not_accumulated", "dW not accumulated across the rows of a program",
           old="dw_acc += dy * x_hat", new="dw_acc = dy * x_hat"),
    Mutant("rms_norm", "dw_bf16_accumulator", "a bf16 accumulator in the dW reduction",
           old="dw_acc += dy * x_hat", new="dw_acc = (dw_acc + dy * x_hat).to(tl.bfloat16).to(tl.float32)"),
    Mutant("rms_norm", "last_block_mask_off_by_one", "the last block's mask off by one (looped path)",
           old="            tl.store(y_row + cols, (x_hat * w).to(Y.dtype.element_ty), mask=mask)",
           new="            tl.store(y_row + cols, (x_hat * w).to(Y.dtype.element_ty), mask=cols < n_cols - 1)"),
    Mutant("rms_norm", "eps_outside_sqrt", "eps added outside the square root",
           old="rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)",
           new="rstd = 1.0 / (tl.sqrt(tl.sum(x * x, axis=0) / n_cols) + eps)"),
    Mutant("rms_norm", "dw_accumulated_in_input_dtype", "dW accumulated over a program's rows in the input "
           "dtype (a 16-bit accumulator in bf16): loses ~sqrt(rows) roundoffs, visible from some tens of rows a program",
           old="dw_acc += dy * x_hat", new="dw_acc = (dw_acc + dy * x_hat).to(X.dtype.element_ty).to(tl.float32)",
           dtypes=(torch.bfloat16,)),
    Mutant("rms_norm", "sum_of_squares_accumulated_in_input_dtype", "the looped path's sum of x^2 accumulated "
           "in the input dtype: a 16-bit accumulator over the row's blocks (ci's random rows span at most 20 "
           "blocks, and the base suite let it through in bf16)",
           old="acc += x * x", new="acc = (acc + x * x).to(X.dtype.element_ty).to(tl.float32)",
           dtypes=(torch.bfloat16,)),
]
