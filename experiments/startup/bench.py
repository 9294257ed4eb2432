"""Start-up time: from process start to the end of the first training step, `model=tiny` on the CPU.

    python experiments/startup/bench.py --runs 7        # writes experiments/startup/results.json

Runs `python run.py +stage=flash model=tiny train.device=cpu train.steps=1` in fresh processes and reads
the wall clock when the first step line (`step     0 | ...`) reaches stdout. The first run also builds the
token cache (a cold cache); the median is over the runs that follow it (a warm cache, the usual case).
results.json holds every run's time, the median, the machine, the torch version and the command.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_record  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"


def time_to_first_step(args, env) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    for line in proc.stdout:
        if first is None and line.startswith("step     0 |"):
            first = time.perf_counter() - start
    if proc.wait() != 0 or first is None:
        raise SystemExit(f"error: the run failed (exit {proc.returncode}): python run.py {' '.join(args)}")
    return first


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--data", default=str(SHARED / "data" / "tinyshakespeare.txt"))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results.json"), help="results.json path")
    args = p.parse_args()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if (SHARED / "tiktoken_cache").is_dir():
        env.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
    train_args = ["+stage=flash", "model=tiny", "train.device=cpu", "train.steps=1"]
    with tempfile.TemporaryDirectory() as tmp:
        times = []
        for i in range(args.runs + 1):
            run_args = [*train_args, f"data.path={args.data}", f"data.cache_dir={tmp}/cache",
                        f"hydra.run.dir={tmp}/run{i}"]
            times.append(time_to_first_step(run_args, env))
            print(f"run {i} ({'cold' if i == 0 else 'warm'} token cache): {times[-1]:.2f} s", flush=True)
    warm = times[1:]
    path = bench_record.write(args.out, {"train_args": train_args, "cold_cache_s": times[0], "warm_cache_s": warm,
                                         "median_warm_cache_s": statistics.median(warm)})
    print(f"\nprocess start -> end of step 0, warm cache: median {statistics.median(warm):.2f} s "
          f"(min {min(warm):.2f}, max {max(warm):.2f}, {args.runs} runs); cold cache: {times[0]:.2f} s\nwrote {path}")


if __name__ == "__main__":
    main()
