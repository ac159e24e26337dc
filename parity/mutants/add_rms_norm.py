from . import Mutant

#: add_rms_norm runs rms_norm.py's kernels (their HAS_R / HAS_DS paths): most of its bugs live there.
NORM = "rms_norm"

MUTANTS = [
    Mutant("add_rms_norm", "ds_dropped", "the backward forgets s's own upstream gradient (dx = the norm's dX "
           "alone; one-block path)",
           old="                if HAS_DS:  # add_rms_norm: s's own upstream gradient joins, one rounding for both\n"
               "                    dx += tl.load(DS + r64 * ds_stride + cols, mask=mask, other=0.0).to(tl.float32)\n",
           new="", module=NORM),
    Mutant("add_rms_norm", "ds_read_with_dy_stride", "ds read with dy's row stride (two upstream gradients "
           "sliced out of buffers of different widths)",
           old="DS + r64 * ds_stride", new="DS + r64 * dy_stride", count=2, module=NORM),
    Mutant("add_rms_norm", "looped_second_pass_without_r", "the looped forward's second pass normalises x, "
           "not s = x + r (the first pass, which writes s and the sum of squares, is right)",
           old="x = _row_input(x_row, r_row, s_row, cols, mask, HAS_R, False)",
           new="x = _row_input(x_row, r_row, s_row, cols, mask, False, False)", module=NORM),
    Mutant("add_rms_norm", "s_not_stored_on_looped_path", "the looped forward never writes s (the one-block "
           "path does)",
           old="x = _row_input(x_row, r_row, s_row, cols, cols < n_cols, HAS_R, True)",
           new="x = _row_input(x_row, r_row, s_row, cols, cols < n_cols, HAS_R, False)", module=NORM),
    Mutant("add_rms_norm", "dr_only_when_dx", "the add's gradient computed only when x requires grad (r alone "
           "gets None)",
           old="need_dx = need_x or need_r", new="need_dx = need_x"),
]
