"""Hypothesis building blocks shared by the kernels' ``params`` strategies.

They lean on purpose towards the sizes that break kernels: 1, primes, one off a
power of two, and the edges of a block.
"""
from __future__ import annotations

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


def scale() -> st.SearchStrategy[float]:
    """Magnitude of drawn activations: tiny values test eps handling, large ones overflow paths."""
    return st.sampled_from([1e-3, 0.1, 1.0, 1.0, 4.0, 30.0])
