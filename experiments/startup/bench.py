"""Start-up time: from process start to the end of the first training step, `model=tiny` on the CPU.

    python experiments/startup/bench.py --runs 5

Runs `python run.py +stage=flash model=tiny train.device=cpu train.steps=1` in fresh processes and reads
the wall clock when the first step line (`step     0 | ...`) reaches stdout. The first run also builds the
token cache (a cold cache); the median is over the runs that follow it (a warm cache, the usual case).
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def time_to_first_step(args, env) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    for line in proc.stdout:
        if first is None and line.startswith("step     0 |"):
            first = time.perf_counter() - start
    if proc.wait() != 0 or first is None:
        raise SystemExit(f"run failed (exit {proc.returncode})")
    return first


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--data", default=str(SHARED / "data" / "tinyshakespeare.txt"))
    args = p.parse_args()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if (SHARED / "tiktoken_cache").is_dir():
        env.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
    with tempfile.TemporaryDirectory() as tmp:
        times = []
        for i in range(args.runs + 1):
            run_args = ["+stage=flash", "model=tiny", "train.device=cpu", "train.steps=1", f"data.path={args.data}",
                        f"data.cache_dir={tmp}/cache", f"hydra.run.dir={tmp}/run{i}"]
            times.append(time_to_first_step(run_args, env))
            print(f"run {i} ({'cold' if i == 0 else 'warm'} token cache): {times[-1]:.2f} s", flush=True)
    import torch

    print(f"\nCPU: {cpu_model()} ({os.cpu_count()} cores), python {platform.python_version()}, torch {torch.__version__}")
    print(f"process start -> end of step 0, warm cache: median {statistics.median(times[1:]):.2f} s "
          f"(min {min(times[1:]):.2f}, max {max(times[1:]):.2f}, {args.runs} runs); cold cache: {times[0]:.2f} s")


if __name__ == "__main__":
    main()
