"""transformers' GPT2LMHeadModel as a peer: what a user would train GPT-2 with instead, timed per optimizer step.

    python -m gpt2.benchmark.peers_hf --tokens FILE --out RESULT.json [--batch-size 64 --seq-len 1024 ...]

gpt2/benchmark/peers.py runs this in its own process (a time limit it can enforce, the GPU memory given back at
the end). The model: GPT2Config's GPT-2 124M (vocab 50257, gelu_new) with dropout off, as llm.c and our
runs train, attn_implementation="sdpa", use_cache off; bf16 autocast and TF32 matmuls on a GPU,
torch.compile, and the optimizer of the gpt3-optim stage (conf/stage/gpt3-optim.yaml: fused AdamW, betas
0.9/0.95, wd 0.1 on 2-D weights, warm-up + cosine LR, clip 1.0). The loss is transformers' own, on the
same next-token targets as ours and llm.c's (all T positions, `shift_labels`).
"""

import argparse
import functools
import inspect
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def gpt3_optim_config():
    """OptimConfig with the gpt3-optim stage's `optim:` values, read from its yaml so that they never drift."""
    from omegaconf import OmegaConf

    from gpt2.config import OptimConfig

    stage = OmegaConf.load(REPO / "conf" / "stage" / "gpt3-optim.yaml")
    return OmegaConf.merge(OmegaConf.structured(OptimConfig), stage.optim)


def build_model(tiny: bool, device: torch.device):
    from transformers import GPT2Config, GPT2LMHeadModel

    sizes = dict(n_layer=2, n_head=2, n_embd=64, n_positions=64) if tiny else dict(n_positions=1024)
    config = GPT2Config(**sizes, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                        attn_implementation="sdpa")
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(device)


@functools.lru_cache(maxsize=None)
def takes_shift_labels() -> bool:
    try:
        from transformers.loss import loss_utils
    except ImportError:
        return False
    return "shift_labels" in inspect.signature(loss_utils.ForCausalLMLoss).parameters


def loss_kwargs(y: torch.Tensor) -> dict:
    """The targets for transformers' own loss. It shifts `labels` by one; recent versions take
    `shift_labels`, the targets as they are, so that the loss covers all T positions as ours does. Older
    ones get labels=y: shifted once more, T-1 positions scored, the same work."""
    return {"labels": y, "shift_labels": y} if takes_shift_labels() else {"labels": y}


def measure(tokens, batch_size: int, seq_len: int, total_batch: int, steps: int, skip: int, device: str = "cuda",
            compile: bool = True, tiny: bool = False, log=print) -> dict:
    """Train `steps` optimizer steps of `total_batch` tokens; per step ms (cuda-synchronized) and loss."""
    from gpt2.data.batches import TokenLoader
    from gpt2.training.optim import build_optimizer, lr_at, set_lr

    if total_batch % (batch_size * seq_len):
        raise ValueError(f"total batch {total_batch} is not a multiple of B*T = {batch_size * seq_len}")
    accum = total_batch // (batch_size * seq_len)
    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    if on_gpu:
        torch.set_float32_matmul_precision("high")  # TF32, as llm.c (-f 1) and our tf32 stage
    model = build_model(tiny, dev)
    optim_cfg = gpt3_optim_config()
    optimizer = build_optimizer(model, optim_cfg, dev)
    step_model = torch.compile(model) if compile else model
    loader = TokenLoader(tokens, batch_size, seq_len)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=on_gpu)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    step_ms, losses = [], []
    for step in range(steps):
        sync()
        t0 = time.perf_counter()
        set_lr(optimizer, lr_at(step, optim_cfg, steps))
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=dev)
        for _ in range(accum):
            x, y = (t.to(dev, non_blocking=True) for t in loader.next_batch())
            with autocast:
                loss = step_model(input_ids=x, **loss_kwargs(y)).loss / accum
            loss_sum += loss.detach()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
        optimizer.step()
        sync()
        step_ms.append((time.perf_counter() - t0) * 1000)
        losses.append(loss_sum.item())
        log(f"step {step + 1:4d}/{steps} | loss {losses[-1]:.6f} | {step_ms[-1]:.2f} ms | "
            f"{total_batch / step_ms[-1] * 1000:.0f} tok/s")
    timed = step_ms[skip:] or step_ms[-1:]
    ms = statistics.median(timed)
    return {"status": "ok", "ms_per_step": ms, "tokens_per_sec": total_batch / (ms / 1000), "steps_timed": len(timed),
            "step_ms": step_ms, "losses": losses, "loss_first": losses[0], "loss_last": losses[-1],
            "finite": all(math.isfinite(v) for v in losses), "grad_accum": accum,
            "attn_implementation": model.config._attn_implementation, "compiled": compile,
            "autocast": "bf16" if on_gpu else "none", "fused_adamw": bool(optimizer.param_groups[0].get("fused")),
            "device": torch.cuda.get_device_name(dev) if on_gpu else "cpu", "torch": torch.__version__,
            "transformers": __import__("transformers").__version__}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2.benchmark.peers_hf", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", required=True, help="an llm.c token file (gpt2/benchmark/peers_llmc.py writes it)")
    p.add_argument("--out", required=True, help="the result as JSON")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--total-batch", type=int, default=524288)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip", type=int, default=3, help="steps left out of the median (the first compiles)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--tiny", action="store_true", help="2 layers, width 64: the CPU smoke run")
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    from gpt2.benchmark.peers_llmc import read_token_file

    hf_logging.set_verbosity_error()
    try:
        tokens = read_token_file(Path(args.tokens))
    except (OSError, ValueError) as e:  # no such file, not an llm.c token file
        print(f"error: --tokens {args.tokens}: {e}", file=sys.stderr)
        return 2
    result = measure(tokens, args.batch_size, args.seq_len, args.total_batch, args.steps,
                     args.skip, args.device, not args.no_compile, args.tiny, log=lambda s: print(s, flush=True))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
