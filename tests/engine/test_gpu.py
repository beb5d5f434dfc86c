"""The torch backend on a CUDA device against the same backend on the CPU (issue 20). Marked `gpu`:
skipped where no CUDA device is present, which is every CI machine; scripts/gpu_check.sh runs them
with the benchmark on a machine that has one."""

import numpy as np
import pytest
import torch

from app.bundle.format import load_bundle
from app.engine.torch_backend import TorchScorer
from app.model.linalg import sum_log_singular_values
from app.model.methods import METHODS

from ..tolerances import FLOAT64_PROJECTION_RTOL, float32_rtol

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_the_gpu_is_the_cpus_to_its_precision(tiny_bundle, method):
    bundle = load_bundle(tiny_bundle)
    x = bundle.sample_rows(4096, seed=3)
    gpu, cpu = TorchScorer(bundle, "cuda").score(x, method), TorchScorer(bundle, "cpu").score(x, method)
    rtol = FLOAT64_PROJECTION_RTOL if method == "projected" else float32_rtol(bundle.architecture)
    np.testing.assert_allclose(gpu.score, cpu.score, rtol=rtol, atol=rtol)
    # Flags agree but where a score lies within that rounding of the threshold.
    clear = np.abs(cpu.score - cpu.threshold.value) > rtol * max(1.0, abs(cpu.threshold.value))
    np.testing.assert_array_equal(gpu.is_anomaly[clear], cpu.is_anomaly[clear])


def test_the_gram_schmidt_volume_on_the_gpu_is_the_cpus_in_float64():
    generator = torch.Generator().manual_seed(0)
    J = torch.randn(10_000, 30, 4, generator=generator, dtype=torch.float64) * torch.logspace(-6, 3, 4)
    cpu, gpu = sum_log_singular_values(J), sum_log_singular_values(J.cuda()).cpu()
    # The same operations in float64 on both: only the order of summation inside a kernel differs.
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-9)
