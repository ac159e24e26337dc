from . import Mutant

MUTANTS = [
    Mutant("rope", "position_ids_ignored", "the sequence index used as the position instead of position_ids",
           old="p = tl.load(POS + b * p_sb + srow * p_ss, mask=smask, other=0).to(tl.int64)",
           new="p = srow"),
    Mutant("rope", "partial_pairs_half_head", "partial rotary pairs dim i with i + D/2 (as if R == D)",
           old="p + half, ", new="p + head_dim // 2, ", count=2),
    Mutant("rope", "pass_through_grad_dropped", "partial rotary: the backward never writes the pass-through dims' grad",
           old="for start in range(2 * half, head_dim, BLOCK_P):",
           new="for start in range(2 * half, 2 * half if BWD else head_dim, BLOCK_P):"),
    Mutant("rope", "bwd_plus_sin", "the backward rotates by +sin (the forward rotation) instead of -sin",
           old="ctx.half, bwd=True)", new="ctx.half, bwd=False)"),
    Mutant("rope", "k_head_stride_from_q", "k read with q's head stride (breaks when q/k layouts differ)",
           old="b * ko_sb + srow * ko_ss, k_sh, ko_sh,",
           new="b * ko_sb + srow * ko_ss, q_sh, ko_sh,"),
    Mutant("rope", "cos_batch_assumed_shared", "gathered cos/sin indexed as if their batch dim were always 1",
           old="c_str = (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1))\n"
               "        s_str = (sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(1))",
           new="c_str = (0, cos.stride(1))\n        s_str = (0, sin.stride(1))"),
    Mutant("rope", "k_head_blocks_not_offset", "k's programs number their head blocks from q's count, not from 0",
           old="(hblock - n_q_blocks) * BLOCK_HK", new="hblock * BLOCK_HK"),
]
