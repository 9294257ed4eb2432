"""The training loop, top to bottom: torch flags, data, model, optimizer, the steps, and the summary.

`train(cfg, run_dir, summary)` runs one job of a config composed by Hydra. It fills `summary` as it
learns things, so whatever stops it (bad input, out of memory, Ctrl-C, a NaN) leaves a summary that says
how far it got; the entrypoint writes it.
"""

import contextlib
import gc
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint, distributed, metrics
from .data import TokenLoader, load_tokens, train_val_split
from .config import option_str as value
from .errors import UsageError
from .model import GPT, PRESETS, GPTConfig
from .optim import build_optimizer, describe_optimizer, grad_norm_and_clip, lr_at, set_lr
from .tracking import WandbRun

log = logging.getLogger("gpt2.train")


def gpt_config_from(model_cfg) -> GPTConfig:
    """The model's GPTConfig from the run's `model` section: the preset, then any sizes set explicitly."""
    return GPTConfig.from_preset(
        model_cfg.name, n_layer=model_cfg.n_layer, n_head=model_cfg.n_head, n_embd=model_cfg.n_embd,
        block_size=model_cfg.block_size, vocab_size=model_cfg.vocab_size, attention=value(model_cfg.attention))


# ---- set-up ---------------------------------------------------------------------------------------

def resolve_device(requested: str, ranks: distributed.Ranks) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("train.device=cuda, but torch sees no CUDA device: use train.device=cpu "
                             "(or auto), or install a CUDA build of torch on a machine with a GPU")
        if ranks.local_rank >= torch.cuda.device_count():
            raise UsageError(f"local rank {ranks.local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                             "lower torchrun's --nproc_per_node to the number of GPUs")
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
        return device
    if requested == "mps" and not torch.backends.mps.is_available():
        raise UsageError("train.device=mps, but this torch has no MPS device: use train.device=cpu or auto")
    return torch.device(requested)


def configure_torch(cfg, device: torch.device) -> None:
    """Set every global flag this run depends on: a multirun's earlier job must leave nothing behind."""
    # native bf16 needs compute capability 8.0 (Ampere); torch.cuda.is_bf16_supported() also counts emulation
    if value(cfg.train.autocast_dtype) == "bf16" and device.type == "cuda" \
            and torch.cuda.get_device_capability(device)[0] < 8:
        raise UsageError(f"train.autocast_dtype=bf16, but {torch.cuda.get_device_name(device)} has no bf16 "
                         "support: use train.autocast_dtype=fp32 (stages before bf16), or a newer GPU")
    dynamo = sys.modules.get("torch._dynamo")  # torch.compile imports it; importing it here would cost ~1 s
    if dynamo is not None:
        dynamo.reset()  # compiled graphs and guards of the previous job
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    precision = value(cfg.train.matmul_precision)
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = precision != "highest"
    torch.manual_seed(cfg.train.seed)  # also seeds every CUDA device
    metrics.reset_peak_memory(device)


def check_config(cfg, ranks: distributed.Ranks) -> GPTConfig:
    """Catch the values Hydra's types cannot: sizes, ranges, and how they fit together; the model's config."""
    t, o = cfg.train, cfg.optim
    positive = {"train.batch_size": t.batch_size, "train.seq_len": t.seq_len, "train.val_batches": t.val_batches,
                "train.total_batch_size": t.total_batch_size, "optim.lr": o.lr, "model.n_layer": cfg.model.n_layer,
                "model.n_head": cfg.model.n_head, "model.n_embd": cfg.model.n_embd,
                "model.block_size": cfg.model.block_size, "model.vocab_size": cfg.model.vocab_size}
    for key, v in positive.items():
        if v is not None and v <= 0:
            raise UsageError(f"{key}={v} must be positive")
    not_negative = {"train.steps": t.steps, "train.timing_skip": t.timing_skip, "train.val_every": t.val_every,
                    "train.checkpoint_every": t.checkpoint_every, "optim.warmup_steps": o.warmup_steps,
                    "optim.weight_decay": o.weight_decay, "optim.grad_clip": o.grad_clip}
    for key, v in not_negative.items():
        if v is not None and v < 0:
            raise UsageError(f"{key}={v} must not be negative")
    if cfg.model.name not in PRESETS:
        raise UsageError(f"model.name={cfg.model.name} is not a preset: choose one of {', '.join(PRESETS)}")
    preset = dict(zip(("n_layer", "n_head", "n_embd", "block_size"), PRESETS[cfg.model.name]))
    n_head, n_embd = cfg.model.n_head or preset["n_head"], cfg.model.n_embd or preset["n_embd"]
    if n_embd % n_head:
        raise UsageError(f"model.n_head={n_head} does not divide model.n_embd={n_embd}: choose a number of "
                         "heads that divides the width")
    gpt_config = gpt_config_from(cfg.model)
    seq_len = t.seq_len or gpt_config.block_size
    if seq_len > gpt_config.block_size:
        raise UsageError(f"train.seq_len={seq_len} is longer than the model's context of {gpt_config.block_size}: "
                         f"use train.seq_len<={gpt_config.block_size} or a larger model.block_size")
    micro_tokens = t.batch_size * seq_len * ranks.world_size
    if t.total_batch_size is not None and t.total_batch_size % micro_tokens:
        raise UsageError(f"train.total_batch_size={t.total_batch_size} is not divisible by B*T*world = "
                         f"{t.batch_size}*{seq_len}*{ranks.world_size} = {micro_tokens}: use a multiple of "
                         f"{micro_tokens}, or change train.batch_size / train.seq_len")
    return gpt_config


def build_model(cfg, gpt_config: GPTConfig, device: torch.device) -> GPT:
    if cfg.model.init_from == "scratch":
        model = GPT(gpt_config)
    else:
        try:
            model = GPT.from_pretrained(cfg.model.init_from, vocab_size=gpt_config.vocab_size,
                                        attention=gpt_config.attention)
        except OSError as e:
            raise UsageError(f"model.init_from={cfg.model.init_from}: could not load Hugging Face weights "
                             f"({str(e).splitlines()[0]}); give a hub name (gpt2 ... gpt2-xl) with network "
                             "access, or a folder written by transformers") from None
    return model.to(device)


class StopFlag:
    """Ctrl-C or SIGTERM asks the loop to stop after the current step; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning(f"{signal.Signals(signum).name}: stopping after this step (Ctrl-C again to stop now)")

    def __enter__(self):
        with contextlib.suppress(ValueError):  # signal handlers can only be set from the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@torch.no_grad()
def evaluate(model, tokens, batch_size: int, seq_len: int, batches: int, autocast, ranks,
             device) -> Optional[float]:
    """Mean loss over the first `batches` micro-batches of the held-out split (the same ones every time),
    shared among the ranks so that N processes see the batches one process would."""
    batch_size = min(batch_size, (len(tokens) - 1) // seq_len)
    if batch_size < 1:
        return None  # held-out split shorter than one sequence
    batches = max(1, math.ceil(batches / ranks.world_size))
    loader = TokenLoader(tokens, batch_size, seq_len, ranks.rank, ranks.world_size)
    model.eval()
    total = torch.zeros((), device=device)
    for _ in range(batches):
        x, y = (t.to(device) for t in loader.next_batch())
        with autocast():
            _, loss = model(x, y)
        total += loss.float()
    model.train()
    return distributed.all_reduce_mean(total / batches).item()


# ---- the run --------------------------------------------------------------------------------------

def train(cfg, run_dir: Path, summary: dict) -> dict:
    ranks = distributed.ranks_from_env()
    device = resolve_device(value(cfg.train.device), ranks)
    summary.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
                   device_type=device.type, world_size=ranks.world_size)
    configure_torch(cfg, device)
    gpt_config = check_config(cfg, ranks)
    distributed.init_process_group(ranks, value(cfg.train.ddp_backend), device)

    # data: every rank reads its own share of the same chunks a single process would read
    B, T, W = cfg.train.batch_size, cfg.train.seq_len or gpt_config.block_size, ranks.world_size
    total_batch = cfg.train.total_batch_size or B * T * W
    grad_accum = total_batch // (B * T * W)
    train_tokens, val_tokens = train_val_split(load_tokens(cfg.data), cfg.data.val_fraction)
    train_loader = TokenLoader(train_tokens, B, T, ranks.rank, W)
    summary.update(batch_size=B, seq_len=T, tokens_per_step=total_batch, grad_accum_steps=grad_accum)

    # model, wrapped for speed (compile) and for data parallelism (DDP); raw_model is what we save
    raw_model = build_model(cfg, gpt_config, device)
    model = raw_model
    if W > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        model = torch.compile(model)
    ddp_model = model._orig_mod if cfg.train.compile and W > 1 else model
    optimizer = build_optimizer(raw_model, cfg.optim, device)
    bf16 = value(cfg.train.autocast_dtype) == "bf16"

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)

    model_shape = {k: getattr(raw_model.config, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")}
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    start_step = 0
    if cfg.train.resume:
        summary.update(checkpoint.resume_into(cfg.train.resume, model=raw_model, optimizer=optimizer,
                                              loader=train_loader, model_shape=model_shape, config_yaml=config_yaml))
        start_step = summary["start_step"]
        log.info(f"resumed from {summary['resumed_from']} at step {start_step}")

    dtype = metrics.compute_dtype(device, bf16)
    peak, peak_source = metrics.peak_tflops(device, dtype)
    step_log = metrics.StepLog(run_dir, log, raw_model.flops_per_token(T), peak) if ranks.is_main else None
    tracker = WandbRun(cfg, run_dir) if ranks.is_main else None
    summary.update(compute_dtype=dtype, mfu_peak_tflops=peak, mfu_peak_source=peak_source,
                   params=raw_model.num_params(non_embedding=False))
    if ranks.is_main:
        log.info(f"{summary['stage']}: {summary['params']:,} parameters on {summary['device']} x{W}, "
                 f"B={B} T={T}, {total_batch:,} tokens/step = {grad_accum} micro-step(s)")

    saved_step = None

    def save(step: int) -> None:
        nonlocal saved_step
        if ranks.is_main and step != saved_step:
            checkpoint.save_checkpoint(run_dir / checkpoint.CHECKPOINT_NAME, model=raw_model, optimizer=optimizer,
                                       step=step, data_state=train_loader.state_dict(), config_yaml=config_yaml,
                                       model_shape=model_shape)
        saved_step = step

    def validate(step: int) -> Optional[float]:
        val = evaluate(model, val_tokens, B, T, cfg.train.val_batches, autocast, ranks, device)
        if step_log and val is not None:
            log.info(f"step {step:5d} | val loss {val:.6f}")
            step_log.append({"step": step, "val_loss": val})
        return val

    step_ms, effective_autocast, last_loss, val_loss = [], None, None, None
    status, steps_done = "ok", start_step
    with StopFlag() as stop:
        for step in range(start_step, cfg.train.steps):
            metrics.synchronize(device)
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.optim, cfg.train.steps)
            set_lr(optimizer, lr)
            optimizer.zero_grad(set_to_none=True)
            loss_accum = torch.zeros((), device=device)
            for micro in range(grad_accum):
                x, y = (t.to(device, non_blocking=True) for t in train_loader.next_batch())
                # DDP all-reduces gradients only on the last micro-step; the others just accumulate
                sync = ddp_model.no_sync() if W > 1 and micro < grad_accum - 1 else contextlib.nullcontext()
                with sync:
                    with autocast():
                        _, loss = model(x, y)
                        if effective_autocast is None:  # read back from torch, inside the region
                            effective_autocast = (str(torch.get_autocast_dtype(device.type)).removeprefix("torch.")
                                                  if torch.is_autocast_enabled(device.type) else None)
                    loss = loss / grad_accum  # the gradient of the mean over the whole batch
                    loss_accum += loss.detach()
                    loss.backward()
            distributed.all_reduce_mean(loss_accum)
            norm = grad_norm_and_clip(raw_model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            metrics.synchronize(device)
            ms = (time.perf_counter() - t0) * 1000
            step_loss, step_norm = loss_accum.item(), norm.item()
            if not (math.isfinite(step_loss) and math.isfinite(step_norm)):  # this step's update ruined the weights
                status = "diverged"
                what = (f"loss became {step_loss}" if not math.isfinite(step_loss)
                        else f"gradient norm became {step_norm}")
                kept = f"; the last good checkpoint (step {saved_step}) is kept in {run_dir}" if saved_step else ""
                summary.update(diverged_at_step=step, error=f"{what} at step {step}; lower optim.lr or turn on "
                               f"optim.grad_clip{kept}")
                log.error(summary["error"])
                break
            last_loss, steps_done = step_loss, step + 1
            step_ms.append(ms)
            record = {"step": step, "loss": last_loss, "lr": lr, "grad_norm": step_norm, "ms": ms,
                      "tokens_per_sec": total_batch / (ms / 1000)}
            if step_log:
                step_log.step(record, W)
                tracker.log(record)
            if cfg.train.val_every and steps_done % cfg.train.val_every == 0 and steps_done < cfg.train.steps:
                val_loss = validate(step)
            if cfg.train.checkpoint_every and steps_done % cfg.train.checkpoint_every == 0:
                save(steps_done)
            if distributed.any_rank(stop.requested, device):
                status = "interrupted"
                save(steps_done)
                summary["error"] = f"stopped by a signal after step {step}; resume with train.resume={run_dir}"
                log.warning(summary["error"])
                break

    if status == "ok":
        val_loss = validate(max(steps_done - 1, 0))
        if cfg.train.checkpoint_every:
            save(steps_done)
    effective = {
        "matmul_precision": torch.get_float32_matmul_precision(),
        "tf32": device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32,
        "autocast_dtype": effective_autocast,
        "attention": raw_model.transformer.h[0].attn.attention,
        "vocab_size": raw_model.lm_head.weight.shape[0],
        "optimizer": describe_optimizer(optimizer),
        "lr_schedule": {"name": value(cfg.optim.schedule), "first_lr": lr_at(0, cfg.optim, cfg.train.steps),
                        "last_lr": optimizer.param_groups[0]["lr"], "warmup_steps": cfg.optim.warmup_steps,
                        "decay_steps": cfg.train.steps},
        "grad_clip": cfg.optim.grad_clip,
        "grad_accum_steps": grad_accum,
        "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "compiled": "torch._dynamo" in sys.modules
                    and isinstance(model, sys.modules["torch._dynamo"].eval_frame.OptimizedModule),
        "notes": [],
    }
    if device.type != "cuda" and effective["matmul_precision"] == "high":
        effective["notes"].append(f"matmul_precision={effective['matmul_precision']} selects TF32 tensor cores, "
                                  f"which {device.type} does not have: no effect here")
    if effective_autocast is None and bf16:
        effective["notes"].append("autocast was requested but torch reported it disabled")
    summary.update(status=status, steps=steps_done, final_loss=last_loss, val_loss=val_loss, effective=effective)
    if step_ms:
        median, low, high, n = metrics.steady_state(step_ms, cfg.train.timing_skip)
        tokens_per_sec = total_batch / (median / 1000)
        summary.update(ms_per_step=median, ms_per_step_min=low, ms_per_step_max=high, steps_measured=n,
                       tokens_per_sec=tokens_per_sec,
                       mfu=metrics.mfu(raw_model.flops_per_token(T), tokens_per_sec, W, peak))
    mem, kind = metrics.peak_memory_gib(device)
    summary.update(peak_mem_gib=mem, peak_mem_kind=kind)
    if tracker:
        tracker.finish(summary)
    if ranks.is_main and summary.get("ms_per_step"):
        log.info(f"{summary['stage']}: {summary['ms_per_step']:.2f} ms/step (median of {summary['steps_measured']}), "
                 f"{summary['tokens_per_sec']:,.0f} tok/s, mfu {100 * summary['mfu']:.1f}%, "
                 f"peak memory {mem or 0:.2f} GiB ({kind}), final loss {last_loss:.4f}")
    return summary
