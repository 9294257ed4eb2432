"""GPT-2 in one file: config, blocks, the model, Hugging Face weights in and out, and sampling.

Sampling itself (the KV cache, top-k/top-p, stop strings, batches of prompts) is in gpt2/model/generation.py.

The model knows nothing of training: no optimizer, no schedule, no device policy. Names follow the
Hugging Face checkpoint (transformer.wte, transformer.h.0.attn.c_attn, ...) so weights map one to one.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F

from gpt2.architecture import GPT2_VOCAB_SIZE, PRESETS, Attention, Loss, choice  # noqa: F401 (re-exported)
from gpt2.model import flash4
from gpt2.model.fused_loss import fused_linear_cross_entropy


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context; rows of the position table
    vocab_size: int = GPT2_VOCAB_SIZE  # rows of the token table; 50304 pads 50257 to a multiple of 128
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    attention: str = "manual"  # one of gpt2/architecture.py's Attention: manual (causal mask), flash, flash4
    loss: str = "plain"  # one of its Loss: plain (logits, then cross-entropy), fused (chunked), fused_fp8
    tokenizer_vocab_size: Optional[int] = None  # ids the tokenizer can emit; the rest is padding (None: all)

    def __post_init__(self):
        self.attention, self.loss = choice(Attention, self.attention), choice(Loss, self.loss)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.tokenizer_vocab_size is None:  # a table padded beyond GPT-2's 50257 ids (50304) is padding
            self.tokenizer_vocab_size = min(self.vocab_size, GPT2_VOCAB_SIZE)
        self.tokenizer_vocab_size = min(self.tokenizer_vocab_size, self.vocab_size)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        n_layer, n_head, n_embd, block_size = PRESETS[name]
        sizes = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size)
        sizes.update({k: v for k, v in overrides.items() if v is not None})
        sizes.setdefault("tokenizer_vocab_size", GPT2_VOCAB_SIZE)
        return cls(**sizes)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.attention = config.attention
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        if self.attention == "manual":
            mask = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
            self.register_buffer("mask", mask.view(1, 1, config.block_size, config.block_size), persistent=False)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head) for t in self.c_attn(x).split(C, dim=2))
        if self.attention == "flash4" and cache is None:  # FlashAttention-4 takes (B, T, nh, hs) as it is
            return self.c_proj(flash4.causal_attention(q, k, v).reshape(B, T, C))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:  # generation: this layer's keys and values of earlier positions come from the cache
            k, v = cache.update(k, v)  # (B, nh, past + T, hs)
            mask = cache.mask  # (B, 1, T, past + T), True = may attend (causal, and no left padding); None: all
        else:
            mask = None if self.attention != "manual" else self.mask[:, :, :T, :T]
        if self.attention != "manual":  # flash, and flash4 with a KV cache
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=cache is None)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 was trained with the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # one matrix embeds tokens and scores them
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2: N(0, 0.02) everywhere, zero biases; projections that add into the residual stream are
        # scaled by 1/sqrt(2 * n_layer) so its variance does not grow with depth (two per block)
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def attention(self) -> str:
        """The attention the blocks run (one of Attention), as built rather than as configured."""
        return self.transformer.h[0].attn.attention

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, counted once even though tied; non_embedding leaves out the position table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward): 6N for the weights, 12*L*C*T for attention."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * seq_len

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, cache=None):
        """logits (B, T, vocab_size) and, when targets (B, T) are given, the mean cross-entropy (fp32) over
        targets != -100. With config.loss == "fused" and targets given, lm_head and the loss run fused and
        chunked (gpt2/model/fused_loss.py): the full logits are never made, and None stands in their place.
        With a KV cache (gpt2/model/generation.py) idx holds only the new positions, their positions come from the
        cache, and only the last position's logits are computed: (B, 1, vocab_size)."""
        B, T = idx.size()
        if cache is not None:
            pos = cache.positions  # (B, T): each row counts from its first real token (left padding)
        elif T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than the context of {self.config.block_size}")
        else:
            pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else cache.layers[i])
        x = self.transformer.ln_f(x)
        if targets is not None and self.config.loss in ("fused", "fused_fp8"):
            return None, fused_linear_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                                    fp8=self.config.loss == "fused_fp8")
        logits = self.lm_head(x if cache is None else x[:, -1:])
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, use_cache: bool = True) -> torch.Tensor:
        """Append max_new_tokens tokens to each row of idx (B, T): temperature 0 is greedy, else sampled from
        the top_k tokens and/or the nucleus of mass top_p; padded ids are never drawn. With the KV cache the
        prompt is read once and then one position per token; use_cache=False recomputes the whole context for
        every token (same tokens). Prompts of different lengths, stop strings, streaming: gpt2/model/generation.py."""
        from gpt2.model.generation import generate_ids  # the sampler and its KV cache live there

        return generate_ids(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=generator, use_cache=use_cache)

    # ---- Hugging Face weights: in and out --------------------------------------------------------

    # Hugging Face's GPT-2 stores these as Conv1D weights, (in, out): transposed from nn.Linear's (out, in)
    _CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_pretrained(cls, name_or_path: str, vocab_size: Optional[int] = None,
                        attention: str = "flash") -> "GPT":
        """GPT-2 weights from the Hugging Face hub (gpt2 ... gpt2-xl) or a folder written by transformers.

        The files are read as data (model.safetensors, else pytorch_model.bin with weights_only) and
        config.json and every tensor are checked before the model is built (gpt2/model/files.py): a bad
        file is a ModelFileError (a ValueError) naming it; no folder and no hub access is an OSError.
        vocab_size larger than the checkpoint's pads the token table (e.g. 50304); the padded rows are
        the mean of the real ones, so each padded logit is the mean real logit and, by Jensen, the
        padding can take at most pad/vocab of the probability mass (47/50257: under 0.001 nats of loss).
        """
        from gpt2.model.files import HFWeights, check_mask_memory, hub_or_folder

        folder, shown = hub_or_folder(name_or_path)
        hf = HFWeights(folder, shown)  # checked against its config.json; nothing is built yet
        sizes = hf.sizes
        hf_vocab = sizes["vocab_size"]
        config = GPTConfig(block_size=sizes["block_size"], vocab_size=max(vocab_size or hf_vocab, hf_vocab),
                           n_layer=sizes["n_layer"], n_head=sizes["n_head"], n_embd=sizes["n_embd"],
                           attention=attention, tokenizer_vocab_size=hf_vocab)
        if attention == "manual":
            check_mask_memory(sizes, hf.nbytes, f"{shown}/config.json")
        model = cls(config)
        sd = model.state_dict()
        with torch.no_grad():
            for key, value in hf.tensors():
                if key.endswith(cls._CONV1D):
                    value = value.t()
                if key == "transformer.wte.weight":
                    sd[key][:hf_vocab].copy_(value)
                    sd[key][hf_vocab:].copy_(value.float().mean(dim=0))
                    continue
                sd[key].copy_(value)
        return model

    def save_hf(self, folder) -> None:
        """Write a folder that transformers.GPT2LMHeadModel.from_pretrained loads with the same logits."""
        from transformers import GPT2Config, GPT2LMHeadModel

        c = self.config
        vocab = c.tokenizer_vocab_size  # padded rows are ours alone
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=c.block_size, n_embd=c.n_embd,
                                        n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu_new",
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        hf_sd = hf.state_dict()
        with torch.no_grad():
            for key, value in self.state_dict().items():
                if key == "lm_head.weight" or key not in hf_sd:
                    continue
                value = value.detach().float().cpu()
                if key.endswith(self._CONV1D):
                    value = value.t()
                if key == "transformer.wte.weight":
                    value = value[:vocab]
                hf_sd[key].copy_(value)
        hf.tie_weights()
        Path(folder).mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(folder)
