"""Helpers shared by the parity tests (kept out of conftest so tests can import them)."""
from __future__ import annotations

import json
import os
import time

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from workbench.kernels import PROFILE_LIMITS, KernelSpec
from workbench.kernels import _strategies as S
from workbench.kernels._harness import DTYPES, run_case

from ._gpu_lock import alone as gpu_alone


def profile() -> str:
    return os.environ.get("PARITY_PROFILE") or ("gpu" if torch.cuda.is_available() else "ci")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def repro_command(spec: KernelSpec, dtype: torch.dtype, params: dict, seed: int) -> str:
    return (f"workbench parity --kernel {spec.name} --dtype {dtype_name(dtype)} --seed {seed} "
            f"--params '{json.dumps(params, sort_keys=True)}'")


def case_params(spec: KernelSpec, limits) -> st.SearchStrategy[dict]:
    """The kernel's own params plus, for a differentiable kernel, the harness's upstream
    gradient draws (layout and scale, ``S.upstream``): every kernel gets them alike."""
    params = spec.params(limits)
    if not spec.differentiable:
        return params
    return st.tuples(params, S.upstream()).map(lambda pair: {**pair[0], **pair[1]})


def check_property(spec: KernelSpec, dtype: torch.dtype, **settings_overrides) -> None:
    """Run the parity property of ``spec`` in ``dtype`` under the active profile.
    Raises AssertionError (via hypothesis) on the first counterexample."""
    limits = PROFILE_LIMITS[profile()]
    count = {"examples": 0}

    def prop(params, seed):
        count["examples"] += 1
        try:
            report = run_case(spec, params, dtype, seed)
        except torch.OutOfMemoryError:
            # One GPU serves every xdist worker: another's case may hold what this one needs
            # (a full gpu run lost a case so). Retried once with the GPU alone; an out-of-memory
            # error there is the case's own, and fails it.
            torch.cuda.empty_cache()
            with gpu_alone():
                report = run_case(spec, params, dtype, seed)
        if not report.ok:
            raise AssertionError(report.describe() + "\nreproduce with:\n  "
                                 + repro_command(spec, dtype, params, seed))

    prop = given(params=case_params(spec, limits), seed=S.seed())(prop)
    # The spec's targeted cases run first, in every profile (explicit examples count
    # towards no budget and are never skipped: see KernelSpec.examples).
    for ex in reversed(spec.examples_for(dtype)):
        prop = example(params=ex.params, seed=ex.seed)(prop)
    prop = settings(**settings_overrides)(prop)

    start, ok = time.perf_counter(), False
    try:
        prop()
        ok = True
    finally:
        _record(spec.name, dtype, count["examples"], time.perf_counter() - start, ok, settings_overrides)


def _record(kernel, dtype, examples, seconds, ok, overrides) -> None:
    """Append one line of statistics per property run to $PARITY_STATS (for reports)."""
    path = os.environ.get("PARITY_STATS")
    if not path or overrides:  # mutation runs (with overrides) are not suite statistics
        return
    line = json.dumps({"kernel": kernel, "dtype": dtype_name(dtype), "examples": examples,
                       "seconds": round(seconds, 3), "ok": ok, "profile": profile()})
    with open(path, "a") as fh:
        fh.write(line + "\n")


__all__ = ["check_property", "dtype_name", "DTYPES"]
