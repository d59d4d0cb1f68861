"""The device check (workflow/device_check.py) and its measuring tools (runtime/perf.py), at CPU size."""

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dmvae_lib.models.lightning_dit import lightning_dit
from dmvae_lib.runtime.perf import PeakMemory, count_flops, gemm_peak, saved_activation_bytes
from dmvae_lib.workflow import device_check


def test_flops_count_linear_forward_backward_and_cpu_attention():
    lin = torch.nn.Linear(32, 64, bias=False)
    x = torch.randn(8, 32, requires_grad=True)
    assert count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 8 * 32 * 64  # forward + two backward mms
    q = torch.randn(2, 4, 16, 8, requires_grad=True)
    fwd = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert fwd == 2 * 2 * 2 * 4 * 16 * 16 * 8  # q·kᵀ and p·v, counted on the CPU kernel too


def test_gemm_peak_and_peak_memory_are_positive():
    assert gemm_peak("cpu", torch.float32, 64, 64, 64, seconds=0.05) > 0
    with PeakMemory("cpu") as mem:
        x = torch.ones(2**23)  # 32 MiB
        del x
    assert mem.peak >= 0


def test_saved_activations_on_fake_tensors_equal_the_real_count():
    torch.manual_seed(0)
    net = lightning_dit("tiny", input_size=8, in_channels=4, num_classes=10)
    x, t = torch.randn(3, 4, 8, 8), torch.rand(3)
    real = saved_activation_bytes(lambda: net(x, t, None), exclude=net.parameters())
    with FakeTensorMode():
        fnet = lightning_dit("tiny", input_size=8, in_channels=4, num_classes=10)
        xf, tf = torch.randn(3, 4, 8, 8), torch.rand(3)
        fake = saved_activation_bytes(lambda: fnet(xf, tf, None), exclude=fnet.parameters())
    assert real == fake > 0


def test_memory_plan_at_cpu_size_has_every_stage():
    table = device_check.activation_table(device_check.SIZES["cpu"])
    assert all(v > 0 for v in table["act"].values()) and all(v > 0 for v in table["params"].values())
    plan = device_check.memory_plan(table)
    for stage in device_check.PLAN_STAGES:
        assert f"| {stage} |" in plan


@pytest.mark.slow
def test_device_check_runs_every_stage_at_cpu_size():
    lines: list[str] = []
    results = device_check.run_check("cpu", "cpu", steps=1, echo=lines.append)
    assert [r.stage for r in results] == list(device_check.STAGES)
    for r in results:
        assert r.flops > 0 and r.batch > 0
        assert all(math.isfinite(v) and v > 0 for v in (r.step_s, r.images_per_s, r.achieved, r.mfu_measured))
    table = "\n".join(lines)
    for stage in device_check.STAGES:
        assert any(line.startswith(stage) for line in table.splitlines()), table
    assert "MFU(meas)" in table and "peak MiB" in table
