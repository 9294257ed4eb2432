"""Where one optimizer step's GPU time goes: the project's own step, under torch.profiler, by kernel kind.

    python experiments/profile/step_profile.py --out DIR [--steps 1] +stage=cudnn-attention [key=value ...]

Composes the config exactly as `python run.py +stage=...` would, builds the run with gpt2.training.loop.set_up, runs
two steps to warm up (compilation, autotuning, the allocator), then profiles `--steps` steps. The CUDA
kernels are grouped by what they do (matmuls, attention, the compiled elementwise/fused kernels, optimizer,
copies) and the table says each group's share of the kernel time and of the step's wall time; the gap
between the two is time the GPU sat idle. Writes DIR/profile.md, DIR/profile.json and DIR/trace.json.gz
(open it in Perfetto or chrome://tracing).
"""

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import gpt2.runs.job  # noqa: E402,F401  registers the schema and the resolvers
from gpt2.training import metrics  # noqa: E402
from gpt2.training.loop import set_up, train_step  # noqa: E402

# first match wins: attention before matmul (cuDNN's attention kernels carry "gemm"-like names)
KINDS = [
    ("attention", ("flash", "fmha", "sdpa", "attention", "cudnn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm80_", "cublas", "wgmma")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("compiled (Triton)", ("triton",)),
    ("copy / fill", ("memcpy", "memset", "copy", "fill")),
    ("reduction / elementwise (eager)", ("reduce", "elementwise", "vectorized", "softmax", "layer_norm",
                                         "cross_entropy", "nll", "norm")),
]


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, keys in KINDS if any(k in name for k in keys)), "other")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1, help="steps to profile after two warm-up steps")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for run.py")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*args.overrides, "train.save_checkpoints=false"])
    run_dir = Path(tempfile.mkdtemp(prefix="profile-"))
    summary = {"stage": cfg.stage.name}
    run = set_up(cfg, run_dir, summary)
    t0 = time.perf_counter()
    for step in range(2):
        record = train_step(run, step)
        print(f"warm-up step {step}: {record['ms']:.1f} ms, loss {record['loss']:.4f}", flush=True)
    print(f"warm-up took {time.perf_counter() - t0:.0f} s", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = []
        for step in range(2, 2 + args.steps):
            wall.append(train_step(run, step)["ms"])
        metrics.synchronize(run.device)
    trace = run_dir / "trace.json"
    prof.export_chrome_trace(str(trace))
    with trace.open("rb") as src, gzip.open(out / "trace.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)

    # kernel time from the trace's GPU events (the profiler's tables mix CPU and GPU time per operator)
    events = json.loads(trace.read_text())["traceEvents"]
    per_kernel = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            per_kernel[e["name"]][0] += e.get("dur", 0) / 1000  # us -> ms
            per_kernel[e["name"]][1] += 1
    shutil.rmtree(run_dir, ignore_errors=True)
    per_kind = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        per_kind[kind_of(name)] += ms
    busy, step_wall = sum(per_kind.values()), sum(wall)
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:25]
    result = {"stage": cfg.stage.name, "overrides": args.overrides, "device": summary.get("device"),
              "torch": torch.__version__, "batch_size": run.batch_size, "seq_len": run.seq_len,
              "grad_accum": run.grad_accum, "steps_profiled": args.steps, "step_ms": wall,
              "kernel_ms": busy, "by_kind_ms": dict(per_kind),
              "top_kernels": [{"name": n, "ms": ms, "calls": c, "kind": kind_of(n)} for n, (ms, c) in top]}
    (out / "profile.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# One step of {cfg.stage.name} on {summary.get('device')} (torch {torch.__version__})", "",
             f"B={run.batch_size}, T={run.seq_len}, {run.grad_accum} micro-steps; {args.steps} step(s) profiled: "
             f"wall {step_wall:.1f} ms (under the profiler), GPU kernels {busy:.1f} ms "
             f"({100 * busy / step_wall:.1f} % busy)", "",
             "| kind | ms | % of kernel time | % of wall |", "| --- | ---: | ---: | ---: |"]
    for kind, ms in sorted(per_kind.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {ms:.1f} | {100 * ms / busy:.1f} | {100 * ms / step_wall:.1f} |")
    lines += ["", "| kernel | kind | calls | ms |", "| --- | --- | ---: | ---: |"]
    lines += [f"| `{n[:110]}` | {kind_of(n)} | {c} | {ms:.2f} |" for n, (ms, c) in top]
    (out / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:len(per_kind) + 6]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
