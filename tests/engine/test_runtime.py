"""Where training runs: devices that exist, the precision the CPU runs fast, seeding."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dlkit.engine.runtime import resolve_device, resolve_precision, seed_everything
from dlkit.errors import ConfigError

CPU = torch.device("cpu")


def cpu_has_bf16() -> bool:
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_an_absent_device_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        resolve_device("cuda")
    assert str(info.value) == "device 'cuda' is not available on this machine; use --device cpu or auto"
    assert resolve_device("cpu") == CPU
    if not torch.backends.mps.is_available():
        assert resolve_device("auto") == CPU


def test_precision_auto_follows_the_cpu_flags():
    assert resolve_precision("auto", CPU) == ("bf16" if cpu_has_bf16() else "fp32")
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(ConfigError, match=r"^precision 'bf16' is not supported on mps; use --precision fp32$"):
        resolve_precision("bf16", torch.device("mps"))


def test_seed_everything_seeds_torch_and_returns_a_seeded_generator():
    g1 = seed_everything(7)
    a = (torch.rand(3), torch.randperm(10, generator=g1))
    g2 = seed_everything(7)
    b = (torch.rand(3), torch.randperm(10, generator=g2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    seed_everything(8)
    assert not torch.equal(torch.rand(3), a[0])
