"""What a benchmark's result depends on, for `python -m gpt2.bench` (DIR/env.json): the device, driver and
library versions, whether torch.compile can build kernels here, the commit, and on a GPU its measured
ceilings (a bf16 matmul rate and a device-to-device copy)."""

import os
import platform
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]


def _command(cmd: list) -> Optional[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_commit() -> Optional[str]:
    """HEAD of the repository the code runs from, '+dirty' when files differ from it; None outside a clone."""
    if not (REPO / ".git").exists() or _command(["git", "-C", str(REPO), "rev-parse", "--show-toplevel"]) != str(REPO):
        return None
    head = _command(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    dirty = _command(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return head and head + ("+dirty" if dirty else "")


def environment_facts(measure: bool = True) -> dict:
    """What a result depends on: device, driver, library versions, and whether torch.compile can build."""
    import torch

    facts = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "platform": platform.platform(),
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "c_compiler": shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"),
        "cxx_compiler": shutil.which("c++") or shutil.which("g++") or shutil.which("clang++"),
        "python_headers": (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file(),
        "git_commit": _git_commit(),
        "gpu": None,
    }
    try:
        import triton
        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        smi = _command(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,pstate,clocks.max.sm,"
                        "power.limit,temperature.gpu,utilization.gpu", "--format=csv,noheader"])
        facts["gpu"] = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                        "memory_gib": props.total_memory / 2**30,
                        "capability": list(torch.cuda.get_device_capability(0)),
                        "multiprocessors": props.multi_processor_count, "nvidia_smi": smi,
                        "driver": smi.split(", ")[2] if smi and smi.count(", ") >= 2 else None}
        if measure:
            facts["gpu"].update(measured_ceilings(torch))
    return facts


def measured_ceilings(torch) -> dict:
    """The two ceilings a step is bound by, measured once: a bf16 matmul rate and a device-to-device copy."""
    device = torch.device("cuda", 0)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    src = torch.randn(2**28, device=device)  # 1 GiB of fp32
    dst = torch.empty_like(src)

    def median_ms(fn, reps=20):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    matmul_ms = median_ms(lambda: a @ b)
    copy_ms = median_ms(lambda: dst.copy_(src))
    result = {"bf16_matmul_tflops_8192": 2 * 8192**3 / (matmul_ms / 1e3) / 1e12,
              "copy_gb_per_s_read_plus_write": 2 * src.numel() * 4 / (copy_ms / 1e3) / 1e9}
    a = b = src = dst = None  # noqa: F841  (free the 1.3 GB before the runs start)
    torch.cuda.empty_cache()
    return result
