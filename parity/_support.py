"""Helpers shared by the parity tests (kept out of conftest so tests can import them)."""
from __future__ import annotations

import json
import os

import torch
from hypothesis import given, settings

from workbench.kernels import PROFILE_LIMITS, KernelSpec
from workbench.kernels import _strategies as S
from workbench.kernels._harness import DTYPES, run_case


def profile() -> str:
    return os.environ.get("PARITY_PROFILE") or ("gpu" if torch.cuda.is_available() else "ci")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def repro_command(spec: KernelSpec, dtype: torch.dtype, params: dict, seed: int) -> str:
    return (f"workbench parity --kernel {spec.name} --dtype {dtype_name(dtype)} --seed {seed} "
            f"--params '{json.dumps(params, sort_keys=True)}'")


def check_property(spec: KernelSpec, dtype: torch.dtype, **settings_overrides) -> None:
    """Run the parity property of ``spec`` in ``dtype`` under the active profile.
    Raises AssertionError (via hypothesis) on the first counterexample."""
    limits = PROFILE_LIMITS[profile()]

    @settings(**settings_overrides)
    @given(params=spec.params(limits), seed=S.seed())
    def prop(params, seed):
        report = run_case(spec, params, dtype, seed)
        if not report.ok:
            raise AssertionError(report.describe() + "\nreproduce with:\n  "
                                 + repro_command(spec, dtype, params, seed))

    prop()


__all__ = ["check_property", "dtype_name", "DTYPES"]
