"""``pytest bench/``: the kernel micro-benchmarks of ``workbench.bench.kernels`` as pytest-benchmark
benchmarks, one per (kernel case, stack, pass); pass ``fwd`` is the forward, ``fwd_bwd`` forward +
backward (absent where nothing is differentiable).

The first benchmark of a case times every selected stack of it with ``kernels.measure`` (one timing
for all its stacks: CUDA-graph replays, or CUDA events where a stack cannot be captured); each
benchmark then gives its device-time samples to pytest-benchmark (``kernels.record``, timed by
``kernels.device_clock``), so ``--benchmark-json``, ``--benchmark-compare`` and
``--benchmark-compare-fail`` work on device time. What pytest-benchmark has no field for (peak
memory, the floor's bytes and FLOPs, shape, dtype, device, versions) is in each benchmark's
``extra_info``; the JSON's ``workbench`` section holds the run's setup, the device's measured
ceilings and the stacks that failed (`workbench bench kernels --from-json` makes the report of it).

On the CPU the ``tiny`` shapes run in Triton's interpreter, timed by the wall clock: a check that
the suite works, not a measurement. ``scripts/test.sh`` does not run bench/ (only tests/ and parity/).
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are launched on the CPU

from workbench.bench import kernels as kbench  # noqa: E402 - after the interpreter switch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pytest_addoption(parser):
    group = parser.getgroup("workbench kernels", "the kernel micro-benchmarks (bench/)")
    group.addoption("--bench-shape", metavar="SET", help="shape set: " + ", ".join(kbench.SHAPES)
                    + " (default: llama3-8b on CUDA, tiny on the CPU, where only tiny runs)")
    group.addoption("--bench-dtype", default="bfloat16", choices=list(DTYPES), help="default: bfloat16")
    group.addoption("--bench-only", metavar="KERNELS", default="",
                    help="comma-separated kernel names (default: every kernel)")
    group.addoption("--bench-timing", default="graph", choices=list(kbench.TIMINGS),
                    help="on CUDA: graph (default; each call replayed from a CUDA graph, launch overhead excluded) "
                         "or events (one call between CUDA events, launch overhead included)")
    group.addoption("--bench-no-compile", action="store_true", help="skip the torch.compile stack")


@dataclass(frozen=True)
class Bench:
    """One benchmark: a stack of a prepared case, and the pass it times."""
    case_index: int
    stack_index: int
    stack: str
    pass_: str


@dataclass
class Suite:
    """The run's setup and what it measured, shared by its benchmarks."""
    device: torch.device
    shape: str
    dtype: str
    only: list[str]
    timing: str
    compile_reference: bool
    command: str
    prepared: list[kbench.Prepared] | None = None
    measured: dict[int, dict[str, kbench.Row]] = field(default_factory=dict)
    ceilings: dict | None = None
    env: dict | None = None

    def prepare(self) -> list[kbench.Prepared]:
        if self.prepared is None:
            self.prepared = kbench.prepare(self.shape, DTYPES[self.dtype], self.only or None,
                                           compile_reference=self.compile_reference, device=self.device)
        return self.prepared

    def environment(self) -> dict:
        if self.env is None:
            from workbench.envinfo import environment, version

            self.env = {**environment(), "liger_kernel": version("liger-kernel")}
        return self.env

    def row(self, bench: Bench, selected: list[Bench]) -> kbench.Row:
        """The measured row of ``bench``'s stack; the first call of a case times all its selected stacks."""
        if bench.case_index not in self.measured:
            if self.ceilings is None:  # once, before the first case: the floors' denominators
                self.ceilings = kbench.device_ceilings(self.device)
            stacks = [b.stack for b in selected if b.case_index == bench.case_index]
            rows = kbench.measure(self.prepare()[bench.case_index], self.device, self.timing, stacks,
                                  progress=lambda line: None)
            self.measured[bench.case_index] = {r.stack: r for r in rows}
        return self.measured[bench.case_index][bench.stack]

    def section(self) -> dict:
        """The JSON's ``workbench`` section: the setup, the ceilings, each measured case and the failed stacks."""
        cases, errors = [], []
        for index in sorted(self.measured):
            prepared = self.prepare()[index]
            case = prepared.case
            cases.append({"case_index": index, "kernel": case.kernel, "shape": case.shape,
                          "bytes_moved": case.bytes_moved, "flops": case.flops,
                          "floor_ms": kbench.floor_ms(case, self.ceilings or {})})
            errors += [{"case_index": index, "stack_index": prepared.stacks.index(r.stack), "kernel": case.kernel,
                        "shape": case.shape, "stack": r.stack, "error": r.error}
                       for r in self.measured[index].values() if r.error]
        return {"suite": "kernels", "shape": self.shape, "shape_dims": kbench.SHAPES[self.shape], "dtype": self.dtype,
                "timing": self.timing if self.device.type == "cuda" else "wall",
                "compile_reference": self.compile_reference, "ceilings": self.ceilings or {},
                "environment": self.environment(), "command": self.command, "cases": cases, "errors": errors}


SUITE = pytest.StashKey[Suite]()


class _BenchmarkHooks:
    """pytest-benchmark's hooks, registered only where it is installed (pluggy refuses unknown hooks)."""

    def __init__(self, suite: Suite):
        self.suite = suite

    def pytest_benchmark_update_json(self, config, benchmarks, output_json):
        output_json["workbench"] = self.suite.section()

    def pytest_benchmark_update_machine_info(self, config, machine_info):
        # --benchmark-compare warns when machine_info differs: another GPU or stack is worth a warning.
        env = self.suite.environment()
        machine_info["workbench"] = {k: env.get(k) for k in ("device", "torch", "cuda", "triton")}


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("benchmark"):
        raise pytest.UsageError("pytest bench/ needs pytest-benchmark: install the test extra "
                                "(pip install -e '.[test]'), or pytest-benchmark on a GPU host "
                                "(scripts/gpu-host-packages.txt).")
    device = kbench.default_device()
    shape = config.getoption("--bench-shape") or ("llama3-8b" if device.type == "cuda" else "tiny")
    if shape not in kbench.SHAPES:
        raise pytest.UsageError(f"unknown --bench-shape {shape!r}; use one of {', '.join(kbench.SHAPES)}.")
    if device.type != "cuda" and shape != "tiny":
        raise pytest.UsageError(f"--bench-shape {shape} needs a CUDA device; on the CPU only tiny runs "
                                "(a check that the suite works).")
    only = [k for k in config.getoption("--bench-only").split(",") if k]
    from workbench.kernels import registry

    unknown = sorted(set(only) - set(registry()))
    if unknown:
        raise pytest.UsageError(f"unknown kernel(s) in --bench-only: {', '.join(unknown)}; see `workbench kernels`.")
    suite = Suite(device, shape, config.getoption("--bench-dtype"), only, config.getoption("--bench-timing"),
                  not config.getoption("--bench-no-compile"),
                  command=shlex.join(["pytest", *config.invocation_params.args]))
    config.stash[SUITE] = suite
    config.pluginmanager.register(_BenchmarkHooks(suite), "workbench-kernel-benchmarks")


def _slug(stack: str) -> str:
    """A stack's label as a test id word: "torch (HF eager)" -> "torch_hf_eager"."""
    return re.sub(r"[^a-z0-9.]+", "_", stack.lower()).strip("_")


def pytest_generate_tests(metafunc):
    if "kernel_bench" not in metafunc.fixturenames:
        return
    suite = metafunc.config.stash[SUITE]
    params = []
    for ci, prepared in enumerate(suite.prepare()):
        for si, stack in enumerate(prepared.stacks):
            for pass_ in prepared.passes:
                # The shape set and dtype are in the id: --benchmark-compare matches benchmarks by name,
                # and a time of another shape is no baseline.
                name = f"{suite.shape}-{suite.dtype}-{prepared.case.kernel}-{_slug(stack)}-{pass_}"
                params.append(pytest.param(Bench(ci, si, stack, pass_), id=name))
    metafunc.parametrize("kernel_bench", params)


@pytest.fixture(scope="session")
def bench_suite(request) -> Suite:
    return request.config.stash[SUITE]


@pytest.fixture
def measured(request, bench_suite, kernel_bench):
    """(the prepared case, its stack's measured row, extra_info for the benchmark) of this benchmark."""
    selected = [item.callspec.params["kernel_bench"] for item in request.session.items
                if hasattr(item, "callspec") and "kernel_bench" in item.callspec.params]
    row = bench_suite.row(kernel_bench, selected)
    prepared = bench_suite.prepare()[kernel_bench.case_index]
    info = kbench.extra_info(prepared, row, kernel_bench.pass_, case_index=kernel_bench.case_index,
                             stack_index=kernel_bench.stack_index, shape_set=bench_suite.shape, dtype=bench_suite.dtype,
                             floor=kbench.floor_ms(prepared.case, bench_suite.ceilings or {}),
                             env=bench_suite.environment())
    return prepared, row, info
