"""The checks Hydra's types cannot make, run before anything is built or written.

Hydra refuses a typo in a key or a value of the wrong type when the config is composed; each section checks
its own ranges beside its fields (gpt2/config.py, `check()`); here is what needs more than one section: the
model's sizes against the batch, the device a setting needs, the compiler. Each refusal is a one-line
`UsageError` that names the key and says how to fix it.
"""

import difflib
import typing

from gpt2.config import Config, TrainConfig, as_config, require
from gpt2.config import option_str as value
from gpt2.model.gpt import GPTConfig


def model_config(config: Config) -> GPTConfig:
    """The GPTConfig a run builds from scratch: the preset of `model`, then any sizes set explicitly."""
    return GPTConfig.from_preset(config.model.name, **config.model.preset_overrides())


def check_sizes(train: TrainConfig, block_size: int, world_size: int, from_weights: bool = False) -> int:
    """T for this run (train.seq_len, or the model's context), checked against the context and the batch.
    `from_weights`: the context is that of model.init_from's weights, which no model.block_size can change."""
    seq_len = train.seq_len or block_size
    require(seq_len <= block_size, f"train.seq_len={seq_len} is longer than the model's context of {block_size}: "
                                   f"use train.seq_len<={block_size}" +
            ("" if from_weights else " or a larger model.block_size"))
    micro_tokens = train.batch_size * seq_len * world_size
    require(train.total_batch_size is None or train.total_batch_size % micro_tokens == 0,
            f"train.total_batch_size={train.total_batch_size} is not divisible by B*T*world = "
            f"{train.batch_size}*{seq_len}*{world_size} = {micro_tokens}: use a multiple of {micro_tokens}, or "
            "change train.batch_size / train.seq_len")
    return seq_len


def check_fp8_head(config: Config, gpt_config: GPTConfig, ranks) -> None:
    """model.loss=fused_fp8 (the fp8-head stage): sizes its FP8 matmuls take, on a device that has them. The
    device is resolved here (as the run will) so that a sweep's job, checked only when it starts, is refused too."""
    if value(config.model.loss) != "fused_fp8":
        return
    from gpt2.training.devices import resolve_device
    from gpt2.model.fp8 import ALIGNMENT, fp8_unsupported_reason

    for key, size in (("model.vocab_size", gpt_config.vocab_size), ("model.n_embd", gpt_config.n_embd)):
        require(size % ALIGNMENT == 0, f"model.loss=fused_fp8 needs {key} to be a multiple of {ALIGNMENT} (FP8 "
                                        f"matmuls), not {size}: " + ("use model.vocab_size=50304" if "vocab" in key
                                                                     else "choose another width"))
    reason = fp8_unsupported_reason(resolve_device(value(config.train.device), ranks))
    require(reason is None, f"model.loss=fused_fp8 (stage fp8-head) needs FP8 matmuls, but {reason}: use "
                             "model.loss=fused (the big-batch stage) on this device")


def check_flash4(config: Config, gpt_config: GPTConfig, ranks) -> None:
    """model.attention=flash4 (the flash4 stage): FlashAttention-4's package, a Hopper or Blackwell GPU, bf16
    autocast and a head size its tiles take; the device resolved here too, as for the fp8-head stage."""
    if value(config.model.attention) != "flash4":
        return
    from gpt2.model.flash4 import unsupported_reason
    from gpt2.training.devices import resolve_device

    device = resolve_device(value(config.train.device), ranks)
    reason = unsupported_reason(device, value(config.train.autocast_dtype), gpt_config.n_embd // gpt_config.n_head)
    require(reason is None, f"model.attention=flash4 (stage flash4) needs FlashAttention-4, but {reason}: use "
                            "model.attention=flash (SDPA) here")


def check_compile(train: TrainConfig, device) -> None:
    """train.compile=true: a compiler for the device, and train.compile_options that Inductor has, each of its
    type. torch.compile makes the same check only when it is called, after the data and the model are built."""
    from gpt2.training.devices import check_compiler

    check_compiler(device)
    if not train.compile_options:
        return
    from torch._inductor import config as inductor

    known = inductor.get_config_copy()
    for key, given in train.compile_options.items():
        name = key.replace("-", "_")  # as torch.compile reads them
        near = difflib.get_close_matches(name, [k for k in known if not k.startswith("_")], n=3)
        require(name in known, f"train.compile_options.{key} is not an Inductor option" +
                (f" (did you mean {' or '.join(near)}?)" if near else "") +
                "; the names: python -c 'import torch._inductor; print(torch._inductor.list_options())'")
        expected = inductor.get_type(name)
        # a generic type (Optional[int], list[str]) cannot be checked with isinstance: torch.compile skips it too
        require(typing.get_origin(expected) is not None or isinstance(given, expected),
                f"train.compile_options.{key}={given!r} must be a {type(known[name]).__name__} (its default: "
                f"{known[name]!r})")


def check_config(cfg, ranks) -> GPTConfig:
    """Every check that needs no model or data yet (each section's own, then how they fit together); the model's
    config. `cfg`: the composed config or its typed form (gpt2.config.as_config)."""
    config = as_config(cfg)
    config.check()
    gpt_config = model_config(config)
    check_fp8_head(config, gpt_config, ranks)
    check_flash4(config, gpt_config, ranks)
    if config.model.init_from == "scratch":
        check_sizes(config.train, gpt_config.block_size, ranks.world_size)
    return gpt_config


def check_before_start(cfg, ranks) -> None:
    """What a run's Hydra callback refuses before Hydra makes the run folder, so that a refused run leaves
    nothing behind: check_config, the device, the compiler, the DDP backend, a train.resume that points at
    nothing. The job checks again (a sweep's jobs differ from the sweep's config; tests call train directly)."""
    from gpt2.training.checkpoint import resolve_checkpoint_path
    from gpt2.training.devices import resolve_device
    from gpt2.distributed import backend_for

    config = as_config(cfg)
    check_config(config, ranks)
    device = resolve_device(value(config.train.device), ranks)  # on a GPU: sets this rank's, as the job would
    if config.train.compile:
        check_compile(config.train, device)
    if ranks.world_size > 1:
        backend_for(value(config.train.ddp_backend), device)
    if config.train.resume:
        resolve_checkpoint_path(str(config.train.resume))
