"""The one switch between a Triton kernel and its torch fallback (dd/worker/engines/kernels/switch.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from dd.worker.engines.kernels.switch import KernelSwitch


def _failing_kernel(calls: list[str]) -> object:
    def kernel() -> torch.Tensor:
        calls.append("kernel")
        raise RuntimeError("no compiler here")
    return kernel


def test_kernel_that_raises_falls_back_once_logs_once_and_gives_the_torch_result(
        caplog: pytest.LogCaptureFixture) -> None:
    x = torch.arange(6.0)
    calls: list[str] = []

    def fallback() -> torch.Tensor:
        calls.append("torch")
        return x * 2

    switch = KernelSwitch("test kernel", "doubling with torch operations instead", cuda_only=False)
    with caplog.at_level(logging.WARNING, logger="dd.worker.engines.kernels.switch"):
        results = [switch.run(_failing_kernel(calls), fallback, on=x) for _ in range(3)]
    for r in results:
        assert torch.equal(r, x * 2)
    assert calls == ["kernel", "torch", "torch", "torch"]  # the kernel is tried once, then remembered
    assert switch.failed and not switch.on
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "test kernel cannot run here (RuntimeError: no compiler here)" in lines[0]
    assert "doubling with torch operations instead" in lines[0]


def test_kernel_runs_where_it_works_and_never_where_it_is_off() -> None:
    x = torch.ones(3)
    on = KernelSwitch("k", "t", cuda_only=False)
    assert torch.equal(on.run(lambda: x + 1, lambda: x - 1, on=x), x + 1) and not on.failed
    disabled = KernelSwitch("k", "t", enabled=False, cuda_only=False)
    unavailable = KernelSwitch("k", "t", available=lambda: False, cuda_only=False)
    cuda_only = KernelSwitch("k", "t")  # x is a CPU tensor
    for switch in (disabled, unavailable, cuda_only):
        assert torch.equal(switch.run(lambda: pytest.fail("kernel ran"), lambda: x - 1, on=x), x - 1)
        assert not switch.failed


def test_probe_undoes_installed_kernels_once_when_the_trial_fails(caplog: pytest.LogCaptureFixture) -> None:
    undone: list[int] = []
    switch = KernelSwitch("model kernels", "using torch operations")

    def trial() -> None:
        raise ValueError("unsupported GPU")

    with caplog.at_level(logging.WARNING, logger="dd.worker.engines.kernels.switch"):
        assert not switch.probe(trial, lambda: undone.append(1))
    assert undone == [1] and switch.failed
    assert sum("model kernels cannot run here (ValueError: unsupported GPU)" in r.getMessage()
               for r in caplog.records) == 1
    ok = KernelSwitch("model kernels", "using torch operations")
    assert ok.probe(lambda: None, lambda: pytest.fail("undone")) and not ok.failed
