"""GPT-2's classifier + cross-entropy, forward and backward: the plain head against the fused, chunked one.

    python experiments/fused_loss/bench.py [--device cuda] [--rows 16384,65536] [--variants a,b] [--out DIR]

For N = B*T rows of hidden states (C = 768) and the padded vocabulary (V = 50304), under bf16 autocast as in
the stages that use it, each variant computes the mean loss and the gradients of x and of the (fp32) weight:

  plain          F.cross_entropy(F.linear(x, W).float(), y): the stages before fused-loss
  plain+compile  the same function through torch.compile (what the compile stage runs)
  fused          gpt2.model.fused_loss.fused_linear_cross_entropy (the fused-loss stage), eager
  fused+compile  the same through torch.compile
  liger          Liger-Kernel's LigerFusedLinearCrossEntropyLoss (Triton), when it is installed

Median time of forward + backward (CUDA events, after warm-up), the peak memory each adds over its inputs,
and the relative error of loss and gradients against the plain head in fp32. Prints a table and writes
results.json to --out.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from gpt2.model.fused_loss import fused_linear_cross_entropy  # noqa: E402


def plain(x, w, y):
    return F.cross_entropy(F.linear(x, w).float(), y)


def variants(device):
    out = {"plain": plain, "fused": fused_linear_cross_entropy,
           "plain+compile": torch.compile(plain), "fused+compile": torch.compile(fused_linear_cross_entropy)}
    if device.type == "cuda":
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss()
            out["liger"] = lambda x, w, y: liger(w, x, y)
        except Exception as e:  # not installed, or no Triton for this device
            print(f"liger: not available ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(fn, x, w, y, device):
    x.grad = w.grad = None
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = fn(x, w, y)
    loss.backward()
    return loss


def measure(fn, x, w, y, device, reps, warmup):
    for _ in range(warmup):  # compilation, autotuning, allocator
        run_once(fn, x, w, y, device)
    sync(device)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        run_once(fn, x, w, y, device)
        sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    extra = None
    if device.type == "cuda":
        x.grad = w.grad = None
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run_once(fn, x, w, y, device)
        sync(device)
        extra = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    return statistics.median(times), min(times), extra


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", default="16384,65536", help="N = B*T values (16384 = B16 x T1024)")
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default=None, help="comma-separated subset (default: all available); on a CPU "
                   "the plain head at N=65536 needs ~40 GB for its fp32 logits and their gradient")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "threads": torch.get_num_threads(), "reps": args.reps, "warmup": args.warmup,
               "torch": torch.__version__, "cuda": torch.version.cuda, "vocab": args.vocab, "width": args.width,
               "rows": []}
    fns = variants(device)
    if args.variants:
        fns = {name: fn for name, fn in fns.items() if name in args.variants.split(",")}
    for n in [int(r) for r in args.rows.split(",")]:
        w = (torch.randn(args.vocab, args.width, device=device) * 0.02).requires_grad_()
        x = torch.randn(n, args.width, device=device).requires_grad_()
        y = torch.randint(0, min(50257, args.vocab), (n,), device=device)
        # reference: the plain head in fp32 (no autocast)
        x.grad = w.grad = None
        ref_loss = plain(x, w, y)
        ref_loss.backward()
        ref = (ref_loss.detach(), x.grad.clone(), w.grad.clone())
        for name, fn in fns.items():
            try:
                median, best, extra = measure(fn, x, w, y, device, args.reps, args.warmup)
                loss = run_once(fn, x, w, y, device)
                row = {"rows": n, "variant": name, "ms_median": median, "ms_min": best, "extra_mem_gib": extra,
                       "rel_err_loss": rel(loss.detach(), ref[0]), "rel_err_grad_x": rel(x.grad, ref[1]),
                       "rel_err_grad_w": rel(w.grad, ref[2]), "error": None}
            except Exception as e:  # out of memory, a kernel missing: a row that says so
                row = {"rows": n, "variant": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
        del w, x, y, ref
    print(f"\n{results['device']}, torch {results['torch']}, V={args.vocab}, C={args.width}, bf16 autocast, fwd+bwd")
    print("| N | variant | ms (median) | ms (min) | extra memory GiB | rel err loss | grad x | grad W |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results["rows"]:
        if r["error"]:
            print(f"| {r['rows']} | {r['variant']} | {r['error']} | | | | | |")
            continue
        mem = "" if r["extra_mem_gib"] is None else f"{r['extra_mem_gib']:.2f}"
        print(f"| {r['rows']} | {r['variant']} | {r['ms_median']:.2f} | {r['ms_min']:.2f} | {mem} | "
              f"{r['rel_err_loss']:.1e} | {r['rel_err_grad_x']:.1e} | {r['rel_err_grad_w']:.1e} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
