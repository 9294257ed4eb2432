"""What a GPT can be built as, torch-free: the size presets, GPT-2's vocabulary, the attention and loss
implementations. The config schema (gpt2/config.py) and the model (gpt2/model/gpt.py) both read them here, so the
allowed values are stated once, and `run.py --help` composes the config without loading torch."""

from enum import Enum

GPT2_VOCAB_SIZE = 50257  # ids the GPT-2 tokenizer produces (50256 is <|endoftext|>)

# name -> (n_layer, n_head, n_embd, block_size); the four GPT-2 sizes, and one for CPU tests
PRESETS = {
    "gpt2": (12, 12, 768, 1024),  # 124M
    "gpt2-medium": (24, 16, 1024, 1024),  # 350M
    "gpt2-large": (36, 20, 1280, 1024),  # 774M
    "gpt2-xl": (48, 25, 1600, 1024),  # 1558M
    "tiny": (2, 2, 64, 64),  # ~3.3M, nearly all of it the token table: seconds per step on a CPU
}


class Attention(str, Enum):
    manual = "manual"  # explicit causal mask + softmax, as in the GPT-2 paper
    flash = "flash"  # F.scaled_dot_product_attention(is_causal=True): FlashAttention kernels on GPU
    flash4 = "flash4"  # FlashAttention-4 (flash-attn-4, CuTe DSL) on Hopper and Blackwell: gpt2/model/flash4.py


class Loss(str, Enum):
    plain = "plain"  # lm_head logits (B*T, V), then cross-entropy: the textbook formulation
    fused = "fused"  # classifier + cross-entropy fused and chunked: the full logits never exist
    # fused, and the classifier's three matmuls (logits, grad input, grad weight) in FP8 with per-tensor dynamic
    # scales (e4m3 forward, e5m2 gradients; gpt2/model/fp8.py): twice the bf16 matmul rate on Ada/Hopper (sm89+)
    fused_fp8 = "fused_fp8"


def choice(enum: type, given) -> str:
    """`given` as the plain string of one of `enum`'s values, or a ValueError listing them."""
    names = [member.value for member in enum]
    text = str(getattr(given, "value", given))
    if text not in names:
        raise ValueError(f"{enum.__name__.lower()} must be one of {', '.join(map(repr, names))}, not {text!r}")
    return text
