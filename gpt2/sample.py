"""Print samples from GPT-2: Hugging Face weights, or a checkpoint of one of our runs.

    python -m gpt2.sample                                   # 5 samples of "Hello, I'm a language model," from gpt2
    python -m gpt2.sample --init outputs/2026-11-25/10-00-00_flash --prompt "ROMEO:" --num-samples 3
    python -m gpt2.sample --init gpt2-xl --seed 7 --max-new-tokens 100 --top-p 0.9 --stop "\\n\\n"
    python -m gpt2.sample --prompt "To be" --prompt "The meaning of life is" --temperature 0   # greedy, 2 prompts

The defaults are those of "Let's reproduce GPT-2 (124M)": 5 samples, 30 new tokens, top-k 50, seed 42.
Generation uses a KV cache (--no-cache recomputes the whole context for every token: same text, slower).
"""

import argparse
import math
import sys

import torch

from gpt2.training.devices import pick_device
from gpt2.errors import UsageError, command
from gpt2.model.generation import EOT, SEED_SPACE, prompt_vocab_size, stream_text
from gpt2.runs.loading import describe, load_model
from gpt2.tokenizer import encode


def sample(model, prompts, num_samples: int = 5, max_new_tokens: int = 30, top_k=50, temperature: float = 1.0,
           seed: int = 42, device: torch.device = torch.device("cpu"), top_p=None, stop=(), stop_at_eot=True,
           use_cache: bool = True) -> list:
    """num_samples texts (prompt + continuation) per prompt, in prompt order. One prompt: the batch shares one
    generator seeded `seed`, as the seed's script did; several prompts: row i is seeded seed + i."""
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = [encode(p) for p in prompts for _ in range(num_samples)]
    model = model.eval().to(device)
    if len(prompts) == 1:
        sampling = dict(generator=torch.Generator(device=device).manual_seed(seed))
    else:
        sampling = dict(seed=seed)
    texts = [p for p in prompts for _ in range(num_samples)]
    for i, piece, _ in stream_text(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   stop=stop, stop_ids=(EOT,) if stop_at_eot else (), use_cache=use_cache,
                                   **sampling):
        texts[i] += piece
    return texts


def _check(args) -> None:
    """One UsageError naming the option for each value that cannot be used."""
    if not args.prompt or any(p == "" for p in args.prompt):
        raise UsageError("--prompt is empty: give the text to continue (at least one character)")
    if args.num_samples < 1:
        raise UsageError(f"--num-samples {args.num_samples} must be at least 1")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k {args.top_k} must be at least 1 (--top-k none turns top-k off)")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UsageError(f"--temperature {args.temperature} must be 0 (greedy) or positive (below 1e-5: greedy too)")
    if args.top_p is not None and not (0 < args.top_p <= 1):
        raise UsageError(f"--top-p {args.top_p} must be in (0, 1]")
    if any(s == "" for s in args.stop):
        raise UsageError("--stop is empty: give a string to stop at")
    if not -SEED_SPACE // 2 <= args.seed < SEED_SPACE:
        raise UsageError(f"--seed {args.seed} is not a 64-bit integer: give one in "
                         f"{-SEED_SPACE // 2}..{SEED_SPACE - 1}")


def _check_vocabulary(prompts, model) -> None:
    """A model with fewer token ids than GPT-2's tokenizer (a tiny vocab_size) cannot read every text."""
    vocab = prompt_vocab_size(model)
    for text in prompts:
        bad = [t for t in encode(text) if t >= vocab]
        if bad:
            raise UsageError(f"--prompt {text[:40]!r} encodes to token id {bad[0]}, beyond this model's vocabulary of "
                             f"{vocab} ids: give a prompt whose tokens are all below {vocab}")


def _top_k(value: str):
    if value.lower() in ("none", "off"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number or 'none'") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for every other bad input
        self.exit(2, f"error: {message}\n")


@command()
def main(argv=None) -> int:
    p = _Parser(prog="python -m gpt2.sample", description=__doc__.splitlines()[0])
    p.add_argument("--init", default="gpt2", help="hub name (gpt2 ... gpt2-xl), HF folder, checkpoint or run folder")
    p.add_argument("--prompt", action="append", help="text to continue; repeat for several prompts "
                                                     "(default: \"Hello, I'm a language model,\")")
    p.add_argument("--num-samples", type=int, default=5, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--top-k", type=_top_k, default=50, help="sample from the k likeliest tokens ('none': all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the likeliest tokens holding p")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--stop", action="append", default=[], help="stop at this text (not printed); repeatable")
    p.add_argument("--no-stop-at-eot", dest="stop_at_eot", action="store_false",
                   help="go on past <|endoftext|> (by default a sample ends there)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-cache", dest="use_cache", action="store_false",
                   help="recompute the whole context for every token (no KV cache; same text, slower)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    args = p.parse_args(argv)
    args.prompt = args.prompt if args.prompt is not None else ["Hello, I'm a language model,"]
    _check(args)
    device = pick_device(args.device, "--device")
    model, info = load_model(args.init)
    _check_vocabulary(args.prompt, model)
    print(f"# {describe(info)}", file=sys.stderr)
    for text in sample(model, args.prompt, args.num_samples, args.max_new_tokens, args.top_k,
                       args.temperature, args.seed, device, top_p=args.top_p, stop=args.stop,
                       stop_at_eot=args.stop_at_eot, use_cache=args.use_cache):
        print(">>", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
