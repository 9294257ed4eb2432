"""New tokens per second: our generate with and without the KV cache, and transformers' generate.

GPT-2 124M shape, random weights (the same weights in both models), fp32, batch 1, a 32-token prompt,
256 new tokens, greedy (temperature 0) so that both libraries must produce the same tokens, and top-k 50
sampling. Side by side in one process, order rotated each round; the figure is the best of the rounds (other
work on a shared CPU only ever slows a run down, so the fastest round is the least disturbed).
The no-cache path runs once, greedy (it recomputes the whole context for every token: minutes at 256).

    python experiments/generation/bench.py                             # 5-15 minutes on a 2-core CPU
    python experiments/generation/bench.py --rounds 5 --no-cache-tokens 0   # no no-cache run: ~3 minutes

It writes results.json beside itself (--out elsewhere): every round's seconds, the best rate of each
generator, whether the greedy tokens agreed, the machine, the versions and the command.
"""

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_record  # noqa: E402
from gpt2.model.gpt import GPT, GPTConfig  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--no-cache-tokens", type=int, default=256,
                   help="new tokens for the (slow) no-cache run; 0 skips it")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results.json"), help="results.json path")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import GPT2LMHeadModel, __version__ as tf_version

    torch.manual_seed(0)
    ours = GPT(GPTConfig(attention="flash")).eval()  # 124M, vocab 50257
    with tempfile.TemporaryDirectory() as folder:
        ours.save_hf(folder)
        theirs = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="sdpa").eval()
    prompt = torch.randint(0, 50257, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    n = args.new_tokens
    ones = torch.ones_like(prompt)

    def run(name, mode):
        with torch.no_grad():
            if name == "ours, KV cache":
                g = torch.Generator().manual_seed(0)
                kw = dict(temperature=0) if mode == "greedy" else dict(top_k=50, generator=g)
                return ours.generate(prompt, n, **kw)
            if name == "transformers":
                kw = dict(do_sample=False) if mode == "greedy" else dict(do_sample=True, top_k=50, top_p=1.0,
                                                                          temperature=1.0)
                torch.manual_seed(0)
                return theirs.generate(prompt, attention_mask=ones, max_new_tokens=n, min_new_tokens=n,
                                       pad_token_id=50256, use_cache=True, **kw)
            kw = dict(temperature=0) if mode == "greedy" else dict(top_k=50, generator=torch.Generator().manual_seed(0))
            return ours.generate(prompt, args.no_cache_tokens, use_cache=False, **kw)

    print(f"torch {torch.__version__}, transformers {tf_version}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; GPT-2 124M shape, random weights, fp32, batch 1, "
          f"{args.prompt_tokens}-token prompt, {n} new tokens (no cache: {args.no_cache_tokens})", flush=True)
    run("ours, KV cache", "greedy"), run("transformers", "greedy")  # warm-up
    rows, same_tokens = {}, {}
    for mode in ("greedy", "top-k 50"):
        names = ["ours, KV cache", "transformers"]
        times = {k: [] for k in names}
        outs = {}
        for r in range(args.rounds):
            for name in names[r % 2:] + names[:r % 2]:
                dt, outs[name] = timed(lambda: run(name, mode))
                times[name].append(dt)
        if mode == "greedy":
            same = same_tokens["ours vs transformers"] = torch.equal(outs["ours, KV cache"], outs["transformers"])
            print(f"greedy: ours and transformers produce the same {n} tokens: {same}", flush=True)
        # once: at 256 tokens it takes minutes, and sampling costs next to nothing
        if mode == "greedy" and args.no_cache_tokens:
            dt, out = timed(lambda: run("ours, no cache", mode))
            times["ours, no cache"] = [dt * n / args.no_cache_tokens]
            if args.no_cache_tokens == n:
                same_tokens["KV cache vs no cache"] = torch.equal(out, outs["ours, KV cache"])
                print(f"greedy: KV cache and no cache produce the same tokens: "
                      f"{same_tokens['KV cache vs no cache']}", flush=True)
        for name, ts in times.items():
            rows[(mode, name)] = n / min(ts), ts
    print()
    print("| sampling | generator | new tokens/s | seconds for 256 (runs) | vs no cache | vs transformers |")
    print("| --- | --- | ---: | --- | ---: | ---: |")
    for (mode, name), (tps, ts) in rows.items():
        base, hf = rows.get(("greedy", "ours, no cache"), (float("nan"),))[0], rows[(mode, "transformers")][0]
        vs_base = f"{tps / base:.2f}x" if base == base else "-"  # nan: no-cache run skipped
        print(f"| {mode} | {name} | {tps:.1f} | {', '.join(f'{t:.2f}' for t in ts)} | {vs_base} "
              f"| {tps / hf:.2f}x |")
    settings = {k: getattr(args, k) for k in ("prompt_tokens", "new_tokens", "no_cache_tokens", "rounds")}
    path = bench_record.write(args.out, {
        "transformers": tf_version, "settings": settings, "same_greedy_tokens": same_tokens,
        "rows": [{"sampling": mode, "generator": name, "best_tokens_per_s": tps, "seconds": ts}
                 for (mode, name), (tps, ts) in rows.items()]})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
