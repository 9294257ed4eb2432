"""The checks Hydra's types cannot make: sizes, ranges, and how settings fit together.

Hydra refuses a typo in a key or a value of the wrong type when the config is composed; everything else
that can be known before a run starts is checked here, each with a one-line `UsageError` that names the
key and says how to fix it, before anything is built or written.
"""

import math
from pathlib import Path

from .config import option_str as value
from .errors import UsageError
from .model import GPT2_VOCAB_SIZE, PRESETS, GPTConfig

SIZE_KEYS = ("n_layer", "n_head", "n_embd", "block_size")


def gpt_config_from(model_cfg) -> GPTConfig:
    """The model's GPTConfig from the run's `model` section: the preset, then any sizes set explicitly."""
    return GPTConfig.from_preset(
        model_cfg.name, n_layer=model_cfg.n_layer, n_head=model_cfg.n_head, n_embd=model_cfg.n_embd,
        block_size=model_cfg.block_size, vocab_size=model_cfg.vocab_size, attention=value(model_cfg.attention),
        loss=value(model_cfg.loss))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def check_numbers(cfg) -> None:
    t, o, d = cfg.train, cfg.optim, cfg.data
    positive = {"train.batch_size": t.batch_size, "train.seq_len": t.seq_len, "train.val_batches": t.val_batches,
                "train.total_batch_size": t.total_batch_size, "model.n_layer": cfg.model.n_layer,
                "model.n_head": cfg.model.n_head, "model.n_embd": cfg.model.n_embd,
                "model.block_size": cfg.model.block_size, "model.vocab_size": cfg.model.vocab_size,
                "data.max_chars": d.max_chars, "optim.grad_clip": o.grad_clip}
    for key, v in positive.items():
        _require(v is None or v > 0, f"{key}={v} must be positive" +
                 (" (a clip of 0 would zero every gradient; leave it null for no clipping)" if key == "optim.grad_clip"
                  else ""))
    not_negative = {"train.steps": t.steps, "train.timing_skip": t.timing_skip, "train.val_every": t.val_every,
                    "train.checkpoint_every": t.checkpoint_every, "optim.warmup_steps": o.warmup_steps,
                    "train.sample_every": t.sample_every}
    for key, v in not_negative.items():
        _require(v is None or v >= 0, f"{key}={v} must not be negative")
    _require(math.isfinite(o.lr) and o.lr > 0, f"optim.lr={o.lr} must be a positive number (GPT-2 124M: 6e-4)")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
             f"optim.betas={list(o.betas)} must be two numbers in [0, 1), e.g. optim.betas=[0.9,0.95]")
    _require(math.isfinite(o.eps) and o.eps > 0, f"optim.eps={o.eps} must be a small positive number, e.g. 1e-8")
    _require(math.isfinite(o.weight_decay) and o.weight_decay >= 0,
             f"optim.weight_decay={o.weight_decay} must be a number >= 0 (GPT-3: 0.1)")
    _require(0 <= o.momentum < 1, f"optim.momentum={o.momentum} must be in [0, 1)")
    _require(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1] (the cosine "
                                       "floor as a fraction of optim.lr; GPT-3: 0.1)")
    _require(0 <= d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be in [0, 1)")
    cache = Path(str(d.cache_dir)).expanduser()
    _require(not cache.exists() or cache.is_dir(), f"data.cache_dir={d.cache_dir} is a file, not a folder: "
                                                    "point it at a folder (it is created if missing)")


def check_model(cfg) -> GPTConfig:
    m = cfg.model
    _require(m.name in PRESETS, f"model.name={m.name} is not a preset: choose one of {', '.join(PRESETS)}")
    if m.init_from != "scratch":
        explicit = [f"model.{k}={m[k]}" for k in SIZE_KEYS if m[k] is not None]
        _require(not explicit, f"{', '.join(explicit)} cannot be combined with model.init_from={m.init_from}: the "
                               "sizes come from those weights; leave them unset (model.vocab_size may pad)")
    _require(m.vocab_size is None or m.vocab_size >= GPT2_VOCAB_SIZE,
             f"model.vocab_size={m.vocab_size} is smaller than the GPT-2 tokenizer's {GPT2_VOCAB_SIZE} ids: use "
             f"{GPT2_VOCAB_SIZE} or a padded size such as 50304")
    preset = dict(zip(SIZE_KEYS, PRESETS[m.name]))
    n_head, n_embd = m.n_head or preset["n_head"], m.n_embd or preset["n_embd"]
    _require(n_embd % n_head == 0, f"model.n_head={n_head} does not divide model.n_embd={n_embd}: choose a number "
                                   "of heads that divides the width")
    return gpt_config_from(m)


def check_sizes(cfg, block_size: int, world_size: int) -> int:
    """T for this run (train.seq_len, or the model's context), checked against the context and the batch."""
    t = cfg.train
    seq_len = t.seq_len or block_size
    _require(seq_len <= block_size, f"train.seq_len={seq_len} is longer than the model's context of {block_size}: "
                                    f"use train.seq_len<={block_size}" +
             ("" if cfg.model.init_from != "scratch" else " or a larger model.block_size"))
    micro_tokens = t.batch_size * seq_len * world_size
    _require(t.total_batch_size is None or t.total_batch_size % micro_tokens == 0,
             f"train.total_batch_size={t.total_batch_size} is not divisible by B*T*world = "
             f"{t.batch_size}*{seq_len}*{world_size} = {micro_tokens}: use a multiple of {micro_tokens}, or change "
             "train.batch_size / train.seq_len")
    return seq_len


def check_fp8_head(cfg, gpt_config: GPTConfig, ranks) -> None:
    """model.loss=fused_fp8 (the fp8-head stage): sizes its FP8 matmuls take, on a device that has them. The
    device is resolved here (as the run will) so that a sweep's job, checked only when it starts, is refused too."""
    if value(cfg.model.loss) != "fused_fp8":
        return
    from .devices import resolve_device
    from .fp8 import ALIGNMENT, fp8_unsupported_reason

    for key, size in (("model.vocab_size", gpt_config.vocab_size), ("model.n_embd", gpt_config.n_embd)):
        _require(size % ALIGNMENT == 0, f"model.loss=fused_fp8 needs {key} to be a multiple of {ALIGNMENT} (FP8 "
                                        f"matmuls), not {size}: " + ("use model.vocab_size=50304" if "vocab" in key
                                                                     else "choose another width"))
    reason = fp8_unsupported_reason(resolve_device(value(cfg.train.device), ranks))
    _require(reason is None, f"model.loss=fused_fp8 (stage fp8-head) needs FP8 matmuls, but {reason}: use "
                             "model.loss=fused (the big-batch stage) on this device")


def check_config(cfg, ranks) -> GPTConfig:
    """Every check that needs no model or data yet; the model's config."""
    check_numbers(cfg)
    gpt_config = check_model(cfg)
    check_fp8_head(cfg, gpt_config, ranks)
    if cfg.model.init_from == "scratch":
        check_sizes(cfg, gpt_config.block_size, ranks.world_size)
    return gpt_config


def check_before_start(cfg, ranks) -> None:
    """What a run's Hydra callback refuses before Hydra makes the run folder, so that a refused run leaves
    nothing behind: check_config, the device, the compiler, the DDP backend, a train.resume that points at
    nothing. The job checks again (a sweep's jobs differ from the sweep's config; tests call train directly)."""
    from .checkpoint import resolve_checkpoint_path
    from .devices import check_compiler, resolve_device
    from .distributed import backend_for

    check_config(cfg, ranks)
    device = resolve_device(value(cfg.train.device), ranks)  # on a GPU: sets this rank's, as the job would
    if cfg.train.compile:
        check_compiler(device)
    if ranks.world_size > 1:
        backend_for(value(cfg.train.ddp_backend), device)
    if cfg.train.resume:
        resolve_checkpoint_path(str(cfg.train.resume))
