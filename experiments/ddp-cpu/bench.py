"""Data-parallel scaling on the CPU: tok/s of 1 process against 2 (torchrun, gloo), same global batch.

    python experiments/ddp-cpu/bench.py --rounds 3        # writes experiments/ddp-cpu/results.json

Each round runs, in turn: one process with 1 thread, one process with all threads, and torchrun with 2
processes of 1 thread each (torchrun's default), all with `+stage=gpt3-optim model=tiny` and 2048 tokens per
optimizer step. tok/s is each run's own steady-state figure from summary.json; the table shows medians over
the rounds, and the scaling efficiency tok/s(2 processes) / (2 x tok/s(1 process, 1 thread)). results.json
holds every run's figures, the medians, the machine, the torch version and the command.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_record  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
ONE = "1 process, 1 thread"
TWO = "2 processes (torchrun), 1 thread each"


def train_args(steps: int) -> list:
    return ["+stage=gpt3-optim", "model=tiny", "train.device=cpu", "train.batch_size=8", "train.seq_len=64",
            "train.total_batch_size=2048", f"train.steps={steps}", "train.save_checkpoints=false"]


def run(nproc: int, threads: int, folder: Path, data: str, steps: int) -> dict:
    """One training run; its summary.json's steady-state figures."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    if (SHARED / "tiktoken_cache").is_dir():
        env.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    proc = subprocess.run([*launcher, str(REPO / "run.py"), *train_args(steps), f"data.path={data}",
                           f"hydra.run.dir={folder}"], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        raise SystemExit(f"error: the run with {nproc} process(es), {threads} thread(s) failed "
                         f"(exit {proc.returncode}):\n" + "\n".join(tail))
    summary = json.loads((folder / "summary.json").read_text())
    return {k: summary[k] for k in ("tokens_per_sec", "ms_per_step", "steps", "steps_measured", "world_size")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="training steps per run (the first ones are warm-up)")
    p.add_argument("--data", default=str(SHARED / "data" / "tinyshakespeare.txt"))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results.json"), help="results.json path")
    args = p.parse_args()
    threads = os.cpu_count()
    setups = {ONE: (1, 1), f"1 process, {threads} threads": (1, threads), TWO: (2, 1)}
    runs = {name: [] for name in setups}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for name, (nproc, n_threads) in setups.items():
                runs[name].append(run(nproc, n_threads, Path(tmp) / f"{i}-{nproc}-{n_threads}", args.data, args.steps))
                print(f"round {i}: {name}: {runs[name][-1]['tokens_per_sec']:,.0f} tok/s", flush=True)
    median = {name: statistics.median(r["tokens_per_sec"] for r in rs) for name, rs in runs.items()}
    efficiency = median[TWO] / (2 * median[ONE])
    path = bench_record.write(args.out, {
        "train_args": train_args(args.steps), "rounds": args.rounds,
        "setups": {name: {"processes": setups[name][0], "threads_per_process": setups[name][1], "runs": runs[name],
                          "median_tokens_per_sec": median[name]} for name in setups},
        "scaling_efficiency": efficiency})
    print(f"\n{' '.join(train_args(args.steps))}\n")
    print("| setup | tok/s (median) | runs |\n| --- | ---: | --- |")
    for name, rs in runs.items():
        each = ", ".join(f"{r['tokens_per_sec']:,.0f}" for r in rs)
        print(f"| {name} | {median[name]:,.0f} | {each} |")
    print(f"\nscaling efficiency, 2 processes vs 2 x (1 process, 1 thread): {efficiency:.1%}\nwrote {path}")


if __name__ == "__main__":
    main()
