"""What a performance engineer trusts: synchronised step times, steady-state medians, tokens/s, MFU, memory.

One console line per step, one JSON line per step in metrics.jsonl, nothing else printed by the loop.
"""

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


# One timed call of the peak measurement does at most this many FLOPs: a few ms on a 2-core CPU (both
# measurements of a run, at its start and its end, stay well under 0.5 s), a few ms on a GPU
CALL_FLOPS = {"cpu": 4e8, "mps": 2e10, "cuda": 5e11}
MIN_ROWS = 128  # a cut-down measurement keeps at least this many rows: fewer run far below the peak
PEAK_REPS = 3  # timed calls per shape, after one untimed: the best is the peak (a busy machine only slows calls)


def model_matmul_shapes(rows: int, n_embd: int, vocab_size: int, device: torch.device) -> tuple:
    """(m, k, n) of the two kinds of matmul in a training step, as the model runs them: an MLP layer
    (rows, n_embd) x (n_embd, 4*n_embd) and the classifier (rows, n_embd) x (n_embd, vocab_size), where rows is
    B*T of one micro-step. Cut down to CALL_FLOPS per call: the classifier's columns first (its rate hardly
    depends on them), then the rows, never below MIN_ROWS."""
    budget = CALL_FLOPS.get(device.type, CALL_FLOPS["cpu"]) / 6  # forward and backward: 6 m k n
    shapes = []
    for n in (4 * n_embd, vocab_size):
        n = min(n, max(4 * n_embd, int(budget // (rows * n_embd))))
        m = min(rows, max(MIN_ROWS, int(budget // (n_embd * n))))
        shapes.append((m, n_embd, n))
    return tuple(dict.fromkeys(shapes))  # one shape once


def measure_linear_tflops(device: torch.device, dtype: str, shapes, reps: int = PEAK_REPS) -> float:
    """The best rate of F.linear forward and backward (the three matmuls of a training step: 6 m k n FLOPs)
    over `shapes` and `reps` timed calls each, as the model runs it: fp32 tensors, under bf16 autocast when
    `dtype` is bf16 (the casts included), under the global TF32 flags now in force otherwise."""
    best = 0.0
    for m, k, n in shapes:
        x = torch.randn(m, k, device=device, requires_grad=True)
        weight = torch.randn(n, k, device=device, requires_grad=True)
        for rep in range(reps + 1):  # the first call pays for library initialisation and kernel choice
            synchronize(device)
            t0 = time.perf_counter()
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                out = torch.nn.functional.linear(x, weight)
            out.backward(torch.ones_like(out))
            synchronize(device)
            seconds = time.perf_counter() - t0
            if rep:
                best = max(best, 6 * m * k * n / seconds / 1e12)
            x.grad = weight.grad = out = None
    return best


SQUARE_SHAPE = {"cpu": (1024, 1024, 1024), "mps": (2048, 2048, 2048), "cuda": (4096, 4096, 4096)}
_best_measured: dict = {}  # (device, dtype, precision, shapes) -> the best peak measured in this process


def peak_tflops(device: torch.device, dtype: str, shapes=None) -> Tuple[float, str]:
    """(peak TFLOP/s, 'datasheet' | 'measured') for MFU: the datasheet where we know the GPU, else measured on
    the model's `shapes` (model_matmul_shapes; a square matmul when None) in `dtype`.

    A measured peak is measured at every call, and is the best this process has measured for the same
    device, dtype, precision setting and shapes: a run measures at its start and at its end and keeps the
    better (a busy machine makes a measurement low, never high), and the jobs of a sweep share the best.
    """
    if device.type == "cuda":
        product = gpu_product(torch.cuda.get_device_name(device))
        if product is not None:
            return DATASHEET_TFLOPS[product][_DTYPE_COLUMN[dtype]], "datasheet"
    shapes = tuple(shapes or (SQUARE_SHAPE.get(device.type, SQUARE_SHAPE["cpu"]),))
    key = (str(device), dtype, torch.get_float32_matmul_precision(), shapes)
    _best_measured[key] = max(_best_measured.get(key, 0.0), measure_linear_tflops(device, dtype, shapes))
    return _best_measured[key], "measured"


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


def mfu_note(utilisation: Optional[float], peak_source: Optional[str]) -> Optional[str]:
    """Why an MFU figure cannot be trusted (summary.json's mfu_note), or None when nothing is wrong with it."""
    if utilisation is None or utilisation <= 1:
        return None
    if peak_source == "measured":
        return "above 100 % of the measured peak: the peak was measured on a busy machine; not a reliable figure"
    return f"above 100 % of the {peak_source} peak: the FLOP count or the step time is wrong; not a reliable figure"


def mfu_text(utilisation: float, digits: int = 2) -> str:
    """MFU for the console: a percentage, or n/a when it is above 100 % (mfu_note says why)."""
    return f"{100 * utilisation:.{digits}f}%" if utilisation <= 1 else "n/a (above 100% of the peak)"


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
            f"tok/sec {record['tokens_per_sec']:,.0f} | mfu {mfu_text(utilisation)}")
        self.append(record)
        return utilisation

    def append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
