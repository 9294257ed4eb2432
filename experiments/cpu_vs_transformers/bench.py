"""One CPU training step of our GPT versus transformers' GPT2LMHeadModel, side by side in one process.

A step is forward + loss + backward + AdamW step (torch.optim.AdamW defaults, lr 3e-4), fp32 with matmul
precision "highest", dropout off, vocab 50257 (unpadded: the point of the comparison), attention through
F.scaled_dot_product_attention everywhere (ours: attention="flash"; transformers: attn_implementation="sdpa").

Contenders, all holding the same weights (ours written with GPT.save_hf, read back by transformers):
  ours        gpt2/model/gpt.py's GPT with the textbook loss (model.loss=plain: logits, then cross-entropy)
  ours-fused  the same with model.loss=fused (gpt2/model/fused_loss.py: the classifier and loss in chunks)
  before   (with --before FILE) the GPT of another model.py, e.g. an older version, timed in the same rounds
  hf       GPT2LMHeadModel as loaded from that folder (GPT-2's own config: activation gelu_new, use_cache on)
  hf-fast  the same with transformers' fastest equivalent settings: activation gelu_pytorch_tanh (one fused
           kernel, the function ours uses) and use_cache=False (no KV cache built while training)

Before anything is timed the losses and a few gradients are checked to agree. Then the contenders take turns
step by step, the order rotating every round so that none always runs first or last. Shared machines are
noisy: each round first waits for a quiet moment, and a round during which other processes took more than
--max-other of the CPU (read from /proc/stat) is thrown away and run again; the table says how many were.
Reported: median (min-max) ms per step, and each ratio as the ratio of medians and, in brackets, the median
of the per-round ratios. results.json (--out) holds every clean round's times, the medians and ratios, the
machine, the versions and the command.

    python experiments/cpu_vs_transformers/bench.py                      # the default sizes, into results.json
    python experiments/cpu_vs_transformers/bench.py --size gpt2:4:128 --size 4x4x256:8:128 --steps 30
    python experiments/cpu_vs_transformers/bench.py --before /tmp/model_old.py   # before/after as well

A size is MODEL:B:T, MODEL a preset name (gpt2, tiny, ...) or LAYERSxHEADSxWIDTH (e.g. 4x4x256); every
model has the GPT-2 context of 1024 positions.
"""

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_record  # noqa: E402
import gpt2.model.gpt  # noqa: E402

VOCAB = 50257
BLOCK_SIZE = 1024
DEFAULT_SIZES = ["gpt2:4:128", "6x6x384:8:128", "4x4x256:8:256"]


def parse_size(text):
    model, b, t = text.split(":")
    if model in gpt2.model.gpt.PRESETS:
        n_layer, n_head, n_embd, _ = gpt2.model.gpt.PRESETS[model]
    else:
        n_layer, n_head, n_embd = (int(v) for v in model.split("x"))
    return model, dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd), int(b), int(t)


def load_model_file(path):
    spec = importlib.util.spec_from_file_location("model_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class OtherLoad:
    """Share of the CPU that other processes used while the block ran (/proc/stat minus our own CPU time)."""

    HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @classmethod
    def _busy(cls):
        try:
            with open("/proc/stat") as f:
                v = [int(n) for n in f.readline().split()[1:]]
        except OSError:
            return None
        return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / cls.HZ  # all but idle, iowait

    def __enter__(self):
        t = os.times()
        self.busy0, self.own0, self.t0 = self._busy(), t.user + t.system, time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall, busy, t = time.perf_counter() - self.t0, self._busy(), os.times()
        if busy is None or self.busy0 is None:
            self.fraction = 0.0  # no /proc/stat: cannot tell, keep everything
        else:
            other = max(0.0, (busy - self.busy0) - (t.user + t.system - self.own0))
            self.fraction = other / (wall * (os.cpu_count() or 1))


def wait_for_quiet(max_other, timeout_s=300.0, window_s=0.5):
    """Sleep until other processes leave the CPU alone for a short window (or timeout_s passes)."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        with OtherLoad() as load:
            time.sleep(window_s)
        if load.fraction <= max_other:
            return True
    return False


def build(dims, seed, before=None):
    """The contenders with the same weights, all in training mode with dropout off."""
    from transformers import GPT2LMHeadModel

    def ours_from(module, **loss):
        torch.manual_seed(seed)  # same initialisation, so the same weights
        return module.GPT(module.GPTConfig(block_size=BLOCK_SIZE, vocab_size=VOCAB, attention="flash", **dims,
                                           **loss))

    models = {"ours": ours_from(gpt2.model.gpt), "ours-fused": ours_from(gpt2.model.gpt, loss="fused")}
    if before is not None:
        models["before"] = ours_from(before)
        models["before"].load_state_dict(models["ours"].state_dict())
    with tempfile.TemporaryDirectory() as folder:
        models["ours"].save_hf(folder)  # dropout 0 in the written config
        models["hf"] = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="sdpa")
        models["hf-fast"] = GPT2LMHeadModel.from_pretrained(
            folder, attn_implementation="sdpa", activation_function="gelu_pytorch_tanh", use_cache=False)
    for name in ("hf", "hf-fast"):
        hf = models[name]
        assert hf.config._attn_implementation == "sdpa"
        assert hf.transformer.wte.weight is hf.lm_head.weight
        assert hf.config.resid_pdrop == hf.config.embd_pdrop == hf.config.attn_pdrop == 0.0
    assert models["hf"].config.activation_function == "gelu_new"
    assert models["hf-fast"].config.activation_function == "gelu_pytorch_tanh"
    for m in models.values():
        m.train()
    return models


def loss_of(name, model, x, y):
    if not name.startswith("hf"):
        return model(x, y)[1]
    # shift_labels: y already holds the next token of x, as for ours (labels= alone would shift once more)
    return model(input_ids=x, labels=y, shift_labels=y).loss


def check_same(models, x, y):
    """Same loss and same gradients before any timing: the contenders compute the same function."""
    losses = {}
    for name, model in models.items():
        loss = loss_of(name, model, x, y)
        loss.backward()
        losses[name] = loss.item()
    ref = F.cross_entropy(models["hf"](input_ids=x).logits.view(-1, VOCAB), y.view(-1)).item()
    params = {name: dict(m.named_parameters()) for name, m in models.items()}
    for name in models:
        assert abs(losses[name] - ref) < 1e-4, f"{name}: loss {losses[name]} != {ref}"
        for p in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.bias", "transformer.ln_f.weight"):
            g, g_ref = params[name][p].grad, params["hf"][p].grad
            assert torch.allclose(g, g_ref, atol=1e-5, rtol=1e-3), f"{name}: {p} gradients differ"
    for m in models.values():
        m.zero_grad(set_to_none=True)
    return losses


def make_step(name, model):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)

    def step(x, y):
        t0 = time.perf_counter()
        loss = loss_of(name, model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) * 1000

    return step


def bench_size(text, steps, warmup, seed, max_other, before=None, max_tries=10):
    name, dims, B, T = parse_size(text)
    models = build(dims, seed, before)
    names = list(models)
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, VOCAB, (B, T + 1), generator=g) for _ in range(4)]
    losses = check_same(models, batches[0][:, :-1].contiguous(), batches[0][:, 1:].contiguous())
    steppers = {who: make_step(who, m) for who, m in models.items()}
    rounds, rejected, i = [], 0, 0
    while len(rounds) < steps and i < warmup + steps * max_tries:
        batch = batches[i % len(batches)]
        x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        k = i % len(names)
        order = names[k:] + names[:k]  # rotate who goes first
        if i >= warmup:
            wait_for_quiet(max_other)
        with OtherLoad() as load:
            dt = {who: steppers[who](x, y) for who in order}
        if i >= warmup:
            if load.fraction > max_other:
                rejected += 1  # something else took the cores for a while: this round says nothing
            else:
                rounds.append(dt)
        i += 1
    if len(rounds) < steps:
        print(f"warning: {text}: only {len(rounds)} clean rounds of {steps}", file=sys.stderr)
    times = {who: [r[who] for r in rounds] for who in names}
    row = dict(size=text, model=name, params_m=models["ours"].num_params(non_embedding=False) / 1e6, B=B, T=T,
               losses=losses, rounds=len(rounds), rejected=rejected, names=names, rounds_ms=rounds)
    row["ms"] = {who: (statistics.median(v), min(v), max(v)) for who, v in times.items()}

    def ratio(a, b):  # of the medians, and the median of the per-round ratios
        return row["ms"][a][0] / row["ms"][b][0], statistics.median(r[a] / r[b] for r in rounds)

    row["ratios"] = {f"{a}/{b}": ratio(a, b) for a in names if not a.startswith("hf") for b in ("hf", "hf-fast")}
    if before is not None:
        row["ratios"]["ours/before"] = ratio("ours", "before")
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", action="append", help=f"MODEL:B:T, repeatable (default: {' '.join(DEFAULT_SIZES)})")
    parser.add_argument("--steps", type=int, default=20, help="timed rounds per size (each contender one step)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds per size first")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: cores)")
    parser.add_argument("--max-other", type=float, default=0.05,
                        help="reject a round when other processes used more than this share of the CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--before", help="also time the GPT of this model.py (e.g. an older version of "
                        "gpt2/model/gpt.py) in the same rounds, as contender 'before'")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results.json"),
                        help="where to write results.json (default: beside this script)")
    args = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()  # keep the table clean of load/save chatter
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")
    before = load_model_file(args.before) if args.before else None
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}")
    print(f"cpu: {bench_record.cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}")
    print("ours: gpt2/model/gpt.py" + (f"; before: {args.before}" if args.before else ""))
    print(f"{args.steps} timed rounds (+{args.warmup} warm-up) per size, rotating order; fp32; vocab {VOCAB}; "
          f"rounds with other load > {args.max_other:.0%} rejected")
    print("ms: median (min-max) over clean rounds; ratios: of medians (median of per-round ratios)")
    rows = []
    for text in args.size or DEFAULT_SIZES:
        r = bench_size(text, args.steps, args.warmup, args.seed, args.max_other, before)
        rows.append(r)
        print(f"\n{r['model']}: {r['params_m']:.1f}M parameters, B={r['B']}, T={r['T']}, "
              f"{r['rounds']} clean rounds ({r['rejected']} rejected)")
        print("| " + " | ".join(f"{n} ms" for n in r["names"]) + " | " + " | ".join(r["ratios"]) + " |")
        print("|" + " ---: |" * (len(r["names"]) + len(r["ratios"])))
        cells = ["{:.0f} ({:.0f}-{:.0f})".format(*r["ms"][n]) for n in r["names"]]
        cells += ["{:.3f} ({:.3f})".format(*v) for v in r["ratios"].values()]
        print("| " + " | ".join(cells) + " |", flush=True)
    settings = {k: getattr(args, k) for k in ("steps", "warmup", "threads", "max_other", "seed", "before")}
    path = bench_record.write(args.out, {
        "transformers": transformers.__version__, "settings": settings,
        "sizes": [{"size": r["size"], "model": r["model"], "params_m": r["params_m"], "B": r["B"], "T": r["T"],
                   "losses": r["losses"], "clean_rounds": r["rounds"], "rejected_rounds": r["rejected"],
                   "rounds_ms": r["rounds_ms"],
                   "median_ms": {who: ms[0] for who, ms in r["ms"].items()},
                   "min_ms": {who: ms[1] for who, ms in r["ms"].items()},
                   "max_ms": {who: ms[2] for who, ms in r["ms"].items()},
                   "ratios": {k: {"of_medians": v[0], "median_of_rounds": v[1]} for k, v in r["ratios"].items()}}
                  for r in rows]})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
