"""What a performance engineer trusts: synchronised step times, steady-state medians, tokens/s, MFU, memory.

One console line per step, one JSON line per step in metrics.jsonl, nothing else printed by the loop.
"""

import functools
import json
import statistics
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch

# Dense (no sparsity) datasheet peaks in TFLOP/s: (bf16, tf32, fp32). The first name fragment that occurs
# in torch.cuda.get_device_name() wins, so the specific variants come before the generic ones.
DATASHEET_TFLOPS = [
    ("H100 NVL", (835.5, 417.5, 60.0)),
    ("H100 PCIe", (756.5, 378.0, 51.2)),
    ("H100", (989.4, 494.7, 66.9)),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", (835.5, 417.5, 60.0)),
    ("H200", (989.4, 494.7, 66.9)),
    ("GH200", (989.4, 494.7, 66.9)),
    ("A100", (312.0, 156.0, 19.5)),
    ("L40S", (362.05, 183.0, 91.6)),
    ("L4", (121.0, 60.0, 30.3)),
    ("A10", (125.0, 62.5, 31.2)),
    ("RTX 4090", (165.2, 82.6, 82.6)),
    ("RTX 3090", (71.0, 35.6, 35.6)),
]
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
        name = torch.cuda.get_device_name(device)
        for fragment, peaks in DATASHEET_TFLOPS:
            if fragment in name:
                return peaks[_DTYPE_COLUMN[dtype]], "datasheet"
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


def peak_memory_gib(device: torch.device) -> Tuple[Optional[float], str]:
    """(GiB, what was measured): tensors on a GPU; the whole process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda max allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20, "process peak RSS"
    except OSError:
        pass
    return None, "unavailable"


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

    def step(self, record: dict, world_size: int) -> None:
        utilisation = mfu(self.flops_per_token, record["tokens_per_sec"], world_size, self.peak_tflops)
        self.log.info(
            f"step {record['step']:5d} | loss {record['loss']:.6f} | lr {record['lr']:.4e} | "
            f"norm {record['grad_norm']:.4f} | dt {record['ms']:.2f} ms | "
            f"tok/sec {record['tokens_per_sec']:,.0f} | mfu {100 * utilisation:.2f}%")
        self.append(record)

    def append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
