"""What a performance engineer trusts: synchronised step times, steady-state medians, tokens/s, MFU, memory.

One console line per step, one JSON line per step in metrics.jsonl, nothing else printed by the loop.
"""

import functools
import json
import re
import statistics
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch

# Dense (no sparsity) datasheet peaks in TFLOP/s: (bf16, tf32, fp32), keyed by the product as
# `gpu_product` reads it from torch.cuda.get_device_name(). Matching is exact, never by substring:
# "NVIDIA L40" is not an L4, "NVIDIA RTX A1000" is not an A100.
DATASHEET_TFLOPS = {
    "H100 SXM": (989.4, 494.7, 66.9),  # "NVIDIA H100 80GB HBM3"
    "H100 PCIe": (756.5, 378.0, 51.2),
    "H100 NVL": (835.5, 417.5, 60.0),
    "H200 SXM": (989.4, 494.7, 66.9),  # "NVIDIA H200"
    "H200 NVL": (835.5, 417.5, 60.0),
    "GH200": (989.4, 494.7, 66.9),
    "A100": (312.0, 156.0, 19.5),  # SXM and PCIe, 40 and 80 GB: same dense peaks
    "L40S": (362.05, 183.0, 91.6),
    "L40": (181.05, 90.5, 90.5),
    "L4": (121.0, 60.0, 30.3),
    "A10": (125.0, 62.5, 31.2),
    "RTX 4090": (165.2, 82.6, 82.6),
    "RTX 3090": (71.0, 35.6, 35.6),
}


def gpu_product(device_name: str) -> Optional[str]:
    """The DATASHEET_TFLOPS key for a torch.cuda.get_device_name() string, or None for a GPU not listed.

    Names seen: "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA GH200
    480GB", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "NVIDIA L40S", "NVIDIA GeForce RTX 4090".
    """
    words = re.split(r"[\s\-]+", device_name.strip())
    words = [w for w in words if w.upper() not in ("NVIDIA", "GEFORCE", "TESLA")]
    if not words:
        return None
    model, upper = words[0].upper(), {w.upper() for w in words[1:]}
    if model == "RTX" and len(words) > 1:
        model = f"RTX {words[1].upper()}"
    if model in ("H100", "H200"):
        variant = "NVL" if "NVL" in upper else "PCIe" if "PCIE" in upper else "SXM"
        model = f"{model} {variant}"
    return model if model in DATASHEET_TFLOPS else None


_DTYPE_COLUMN = {"bf16": 0, "tf32": 1, "fp32": 2}
_TORCH_DTYPE = {"bf16": torch.bfloat16, "tf32": torch.float32, "fp32": torch.float32}


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a clock reading means the work before it is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def compute_dtype(device: torch.device, autocast_bf16: bool) -> str:
    """The dtype the matmuls actually run in: the column of the peak table MFU is measured against."""
    if autocast_bf16:
        return "bf16"
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 \
            and torch.cuda.get_device_capability(device)[0] >= 8:
        return "tf32"
    return "fp32"


def measure_matmul_tflops(device: torch.device, dtype: str, n: int = 1024, reps: int = 5) -> float:
    """Best-of-`reps` rate of an n x n x n matmul in `dtype`, under the global flags now in force."""
    a = torch.randn(n, n, device=device, dtype=_TORCH_DTYPE[dtype])
    b = torch.randn(n, n, device=device, dtype=_TORCH_DTYPE[dtype])
    a @ b  # first call pays for library initialisation
    best = float("inf")
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def peak_tflops(device: torch.device, dtype: str) -> Tuple[float, str]:
    """(peak TFLOP/s, 'datasheet' | 'measured') for MFU: the datasheet where we know the GPU, else measured.

    A measurement is made once per process and device, dtype and precision setting, so that the jobs of a
    sweep share one yardstick instead of each catching the machine in a different mood.
    """
    return _peak_tflops(device, dtype, torch.get_float32_matmul_precision())


@functools.lru_cache(maxsize=None)
def _peak_tflops(device: torch.device, dtype: str, precision: str) -> Tuple[float, str]:
    if device.type == "cuda":
        product = gpu_product(torch.cuda.get_device_name(device))
        if product is not None:
            return DATASHEET_TFLOPS[product][_DTYPE_COLUMN[dtype]], "datasheet"
        n = 4096
    else:
        n = 1024  # a 2-core CPU does ~0.2 TFLOP/s: keep the measurement to a few tens of ms
    return measure_matmul_tflops(device, dtype, n=n, reps=10), "measured"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "cpu":
        try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory(device: torch.device) -> dict:
    """Peak memory since reset_peak_memory, in GiB, for summary.json.

    On a GPU: tensors (`peak_mem_gib`, max allocated) and what the caching allocator held
    (`peak_mem_reserved_gib`, max reserved: what "fits in 24 GiB" is about), and the device's total. On a
    CPU: the whole process's peak resident memory.
    """
    if device.type == "cuda":
        return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
                "device_mem_gib": torch.cuda.get_device_properties(device).total_memory / 2**30,
                "peak_mem_kind": "cuda max allocated"}
    rss = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return {"peak_mem_gib": rss, "peak_mem_reserved_gib": None, "device_mem_gib": None,
            "peak_mem_kind": "process peak RSS" if rss is not None else "unavailable"}


def steady_state(step_ms: List[float], skip: int) -> Tuple[float, float, float, int]:
    """(median, min, max, count) of step times after the first `skip` warm-up steps (at least one is kept)."""
    kept = step_ms[min(skip, len(step_ms) - 1):]
    return statistics.median(kept), min(kept), max(kept), len(kept)


def mfu(flops_per_token: float, tokens_per_sec: float, world_size: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation of one device: tok/s counts every rank, the peak is one device's."""
    return flops_per_token * tokens_per_sec / world_size / (peak_tflops * 1e12)


class StepLog:
    """metrics.jsonl and the console line, as build-nanogpt prints it; only the main process has one."""

    def __init__(self, folder: Path, log, flops_per_token: float, peak_tflops: float):
        self.path = Path(folder) / "metrics.jsonl"
        self.log = log
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops

    def step(self, record: dict, world_size: int) -> float:
        """The console line and the metrics.jsonl row of one step; returns its MFU (for wandb)."""
        utilisation = mfu(self.flops_per_token, record["tokens_per_sec"], world_size, self.peak_tflops)
        self.log.info(
            f"step {record['step']:5d} | loss {record['loss']:.6f} | lr {record['lr']:.4e} | "
            f"norm {record['grad_norm']:.4f} | dt {record['ms']:.2f} ms | "
            f"tok/sec {record['tokens_per_sec']:,.0f} | mfu {100 * utilisation:.2f}%")
        self.append(record)
        return utilisation

    def append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
