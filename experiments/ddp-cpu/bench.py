"""Data-parallel scaling on the CPU: tok/s of 1 process against 2 (torchrun, gloo), same global batch.

    python experiments/ddp-cpu/bench.py --rounds 3

Each round runs, in turn: one process with 1 thread, one process with all threads, and torchrun with 2
processes of 1 thread each (torchrun's default), all with `+stage=gpt3-optim model=tiny` and 2048 tokens per
optimizer step. tok/s is each run's own steady-state figure from summary.json; the table shows medians over
the rounds, and the scaling efficiency tok/s(2 processes) / (2 x tok/s(1 process, 1 thread)).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
ARGS = ["+stage=gpt3-optim", "model=tiny", "train.device=cpu", "train.batch_size=8", "train.seq_len=64",
        "train.total_batch_size=2048", "train.steps=20"]


def run(nproc: int, threads: int, folder: Path, data: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    if (SHARED / "tiktoken_cache").is_dir():
        env.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    subprocess.run([*launcher, str(REPO / "run.py"), *ARGS, f"data.path={data}", f"hydra.run.dir={folder}"],
                   cwd=REPO, env=env, check=True, capture_output=True)
    return json.loads((folder / "summary.json").read_text())["tokens_per_sec"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data", default=str(SHARED / "data" / "tinyshakespeare.txt"))
    args = p.parse_args()
    setups = {"1 process, 1 thread": (1, 1), f"1 process, {os.cpu_count()} threads": (1, os.cpu_count()),
              "2 processes (torchrun), 1 thread each": (2, 1)}
    results = {name: [] for name in setups}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for name, (nproc, threads) in setups.items():
                results[name].append(run(nproc, threads, Path(tmp) / f"{i}-{nproc}-{threads}", args.data))
                print(f"round {i}: {name}: {results[name][-1]:,.0f} tok/s", flush=True)
    import torch

    print(f"\ntorch {torch.__version__}, {os.cpu_count()} cores; {' '.join(ARGS)}\n")
    print("| setup | tok/s (median) | runs |\n| --- | ---: | --- |")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):,.0f} | {', '.join(f'{v:,.0f}' for v in values)} |")
    one = statistics.median(results["1 process, 1 thread"])
    two = statistics.median(results["2 processes (torchrun), 1 thread each"])
    print(f"\nscaling efficiency, 2 processes vs 2 x (1 process, 1 thread): {two / (2 * one):.1%}")


if __name__ == "__main__":
    main()
