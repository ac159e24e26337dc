from . import Mutant

MUTANTS = [
    Mutant("nf4_dequant", "nibble_order_swapped", "the even element read from the low nibble (bitsandbytes: high)",
           old="nibble = (byte >> (4 - 4 * odd)) & 0xF", new="nibble = (byte >> (4 * odd)) & 0xF"),
    Mutant("nf4_dequant", "offset_missing", "the double-quant offset (mean absmax) not added back",
           old="absmax = c * s + tl.load(OFFSET)", new="absmax = c * s"),
    Mutant("nf4_dequant", "single_nested_block", "one nested absmax for the whole weight (right on small weights)",
           old="s = tl.load(NESTED + blk // NESTED_BLOCK, mask=mask, other=0.0)",
           new="s = tl.load(NESTED)"),
    Mutant("nf4_dequant", "block_index_in_bytes", "the absmax block indexed by byte instead of element",
           old="blk = e // BLOCKSIZE", new="blk = (e >> 1) // BLOCKSIZE"),
    Mutant("nf4_dequant", "absmax_in_bf16", "the dequantized absmax rounded to bf16 before the product",
           old="        absmax = c * s + tl.load(OFFSET)\n",
           new="        absmax = (c * s + tl.load(OFFSET)).to(tl.bfloat16).to(tl.float32)\n"),
]
