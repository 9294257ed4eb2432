"""Print samples from GPT-2: Hugging Face weights, or a checkpoint of one of our runs.

    python -m gpt2.sample                                   # 5 samples of "Hello, I'm a language model," from gpt2
    python -m gpt2.sample --init outputs/2026-11-25/10-00-00_flash --prompt "ROMEO:" --num-samples 3
    python -m gpt2.sample --init gpt2-xl --seed 7 --max-new-tokens 100

The defaults are those of "Let's reproduce GPT-2 (124M)": 5 samples, 30 new tokens, top-k 50, seed 42.
"""

import argparse
import sys
from pathlib import Path

import torch

from .checkpoint import CHECKPOINT_NAME, load_checkpoint
from .errors import UsageError
from .model import GPT, GPT2_VOCAB_SIZE, GPTConfig
from .tokenizer import decode, encode


def load_model(init: str) -> GPT:
    """A checkpoint file or run folder of ours, else a Hugging Face hub name or folder."""
    path = Path(init).expanduser()
    if path.is_file() or (path / CHECKPOINT_NAME).is_file():
        state = load_checkpoint(str(path))
        model = GPT(GPTConfig(**state["model_shape"], attention="flash", tokenizer_vocab_size=GPT2_VOCAB_SIZE))
        model.load_state_dict(state["model"])
        return model
    try:
        return GPT.from_pretrained(init)
    except OSError as e:
        raise UsageError(f"--init {init}: not a checkpoint, run folder or loadable Hugging Face model "
                         f"({str(e).splitlines()[0]})") from None


def sample(model: GPT, prompt: str, num_samples: int, max_new_tokens: int, top_k: int, temperature: float,
           seed: int, device: torch.device) -> list:
    ids = torch.tensor([encode(prompt)] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.eval().to(device).generate(ids, max_new_tokens, temperature=temperature, top_k=top_k,
                                           generator=generator)
    return [decode(row.tolist()) for row in out]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2.sample", description=__doc__.splitlines()[0])
    p.add_argument("--init", default="gpt2", help="hub name (gpt2 ... gpt2-xl), HF folder, checkpoint or run folder")
    p.add_argument("--prompt", default="Hello, I'm a language model,")
    p.add_argument("--num-samples", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    args = p.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda, but torch sees no CUDA device: use --device cpu")
        for text in sample(load_model(args.init), args.prompt, args.num_samples, args.max_new_tokens, args.top_k,
                           args.temperature, args.seed, torch.device(device)):
            print(">>", text)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return UsageError.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
