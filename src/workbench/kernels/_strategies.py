"""Hypothesis building blocks shared by the kernels' ``params`` strategies.

They lean on purpose towards the sizes that break kernels: 1, primes, one off a
power of two, and the edges of a block.
"""
from __future__ import annotations

import triton
from hypothesis import strategies as st

from ._registry import Limits

_AWKWARD = (1, 2, 3, 5, 7, 13, 17, 31, 33, 63, 65, 97, 127, 129, 255, 257, 300, 511, 513,
            1000, 1023, 1025, 2047, 2049, 4095, 4097, 8191, 8192, 65535, 65537, 128256, 151936, 262144)


def dim(lo: int, hi: int) -> st.SearchStrategy[int]:
    """A size in [lo, hi], drawn half the time from the awkward list."""
    hi = max(lo, hi)
    awkward = [v for v in _AWKWARD if lo <= v <= hi] + [hi]
    return st.one_of(st.sampled_from(sorted(set(awkward))), st.integers(lo, hi))


def even_dim(lo: int, hi: int) -> st.SearchStrategy[int]:
    return dim(max(1, lo // 2), max(1, hi // 2)).map(lambda v: 2 * v)


def block(limits: Limits) -> st.SearchStrategy[int | None]:
    """None (the launcher's natural block) most of the time, else a small forced
    block so the looped path runs on the shapes this profile can afford."""
    return st.one_of(st.none(), st.none(), st.sampled_from(limits.forced_blocks))


def seed() -> st.SearchStrategy[int]:
    return st.integers(0, 2**31 - 1)


#: Layouts of a drawn upstream gradient (``_harness.upstream_layout``), the first favoured.
UPSTREAM_LAYOUTS = ("strided", "dense", "expanded", "transposed")


def upstream() -> st.SearchStrategy[dict]:
    """The harness keys of an upstream gradient: its memory layout (``_dy``) and the
    log2 of its magnitude (``_dy_scale``). Upstream gradients in a model are slices of
    wider gradients (``torch.cat([geglu(g, u), other], -1)``), transposes, and stride-0
    broadcasts (the gradient of a sum or a mean); GradScaler multiplies them by up to
    2^16 (fp16), and small losses bring them down towards 2^-24. The extremes are listed
    first, so that the ci profile's 20 examples reach them."""
    return st.fixed_dictionaries({
        "_dy": st.sampled_from(UPSTREAM_LAYOUTS),
        "_dy_scale": st.one_of(st.sampled_from([16, -24, 12, -12, 0]), st.integers(-24, 16)),
    })


def scale() -> st.SearchStrategy[float]:
    """Magnitude of drawn activations: tiny values test eps handling, large ones overflow paths."""
    return st.sampled_from([1e-3, 0.1, 1.0, 1.0, 4.0, 30.0])


def row_shift() -> st.SearchStrategy[float | str]:
    """Each row's mean in units of its spread (the norms' ``shift``): 0, a few, and up
    to 10^3, where a variance formed as E[x^2] - mean^2 cancels away every digit the
    spread had in fp32 (10^6 u_fp32 = 6 %). ``"constant"``: some rows constant (spread
    0), where the variance must come out exactly 0 and the mean exact."""
    return st.sampled_from([1e3, 0.0, 3.0, "constant", 30.0, 1.0])


@st.composite
def norm_rows(draw, limits: Limits) -> dict:
    """Shape of a row-wise op's [batch, rows, hidden] input plus its forced block.
    A forced block is drawn to run the looped path: the row then spans 2..8 blocks
    (a partial last block included), and rows x blocks stays within budget, since
    the interpreter's cost is programs x loop iterations. (Under ci: at most ~190 rows x
    blocks, ~0.6 s a case; many rows of one block are the targeted examples' job.)"""
    forced_block = draw(block(limits))
    batch = draw(st.sampled_from([1, 1, 2, 3]))
    if forced_block is None:
        hidden = draw(dim(1, limits.max_hidden))
        rows_cap = limits.max_elements // (hidden * batch)
    else:
        hidden = draw(dim(forced_block + 1, min(limits.max_hidden, 8 * forced_block)))
        rows_cap = (limits.max_elements // 128) // (batch * triton.cdiv(hidden, forced_block))
    rows = draw(dim(1, max(1, min(limits.max_rows, rows_cap))))
    return {"batch": batch, "rows": rows, "hidden": hidden, "_block": forced_block}
