"""Metrics that need no GPU to check: the datasheet lookup by real device names, timing medians, memory keys."""

import pytest
import torch

from gpt2.training import metrics

# torch.cuda.get_device_name() strings as drivers report them -> the datasheet row they must find
DEVICE_NAMES = [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA A100-SXM4-40GB", "A100"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA A100-PCIE-40GB", "A100"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA L40", "L40"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA A10", "A10"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("NVIDIA GeForce RTX 3090", "RTX 3090"),
    # not in the table: MFU falls back to a measured matmul rate, never to a look-alike's row
    ("NVIDIA RTX A1000", None),
    ("NVIDIA A10G", None),
    ("NVIDIA RTX 6000 Ada Generation", None),
    ("Tesla V100-SXM2-16GB", None),
    ("NVIDIA GeForce RTX 4090 D", "RTX 4090"),
]


@pytest.mark.parametrize("name, product", DEVICE_NAMES)
def test_datasheet_row_matches_the_exact_product(name, product):
    assert metrics.gpu_product(name) == product


def test_look_alikes_get_different_peaks():
    # the substring match this replaces gave the L4's peak to an L40 and the A100's to an RTX A1000
    l4, l40 = (metrics.DATASHEET_TFLOPS[metrics.gpu_product(n)] for n in ("NVIDIA L4", "NVIDIA L40"))
    assert l4 != l40
    assert metrics.gpu_product("NVIDIA RTX A1000") is None


def test_peak_memory_on_cpu_has_every_key():
    mem = metrics.peak_memory(torch.device("cpu"))
    assert set(mem) == {"peak_mem_gib", "peak_mem_reserved_gib", "device_mem_gib", "peak_mem_kind"}
    assert mem["peak_mem_gib"] is None or mem["peak_mem_gib"] > 0
    assert mem["peak_mem_reserved_gib"] is None  # reserved memory is a CUDA allocator's notion


def test_steady_state_skips_warm_up():
    # the median, not the mean: one slow steady step (50 ms) moves the mean to 24 ms, the median stays at 12
    assert metrics.steady_state([900.0, 10.0, 12.0, 50.0], skip=1) == (12.0, 10.0, 50.0, 3)
    assert metrics.steady_state([900.0], skip=3) == (900.0, 900.0, 900.0, 1)  # one step is kept
