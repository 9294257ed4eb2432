"""gpt2-speedrun: GPT-2 (124M) in PyTorch, trained on Tiny Shakespeare, made faster one measured stage at a time."""

__version__ = "0.1.0"
