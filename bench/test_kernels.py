"""Every kernel case of ``workbench.bench.kernels`` and each of its stacks (ours, the PyTorch
reference, torch.compile, Liger, ...), forward and forward + backward, as pytest-benchmark
benchmarks of device time (conftest.py says how). Nothing here asserts a speed: a benchmark
fails only when its stack fails to run; ``--benchmark-compare-fail`` judges the times."""
import pytest

from workbench.bench import kernels as kbench


@pytest.mark.benchmark(timer=kbench.device_clock)
def test_kernel(benchmark, kernel_bench, measured):
    prepared, row, info = measured
    benchmark.group = f"{prepared.case.kernel} {prepared.case.shape} {kernel_bench.pass_}"
    benchmark.extra_info.update(info)
    if row.error:
        pytest.fail(f"{prepared.case.kernel} / {row.stack}: {row.error}", pytrace=False)
    kbench.record(benchmark, row.samples[kernel_bench.pass_])
