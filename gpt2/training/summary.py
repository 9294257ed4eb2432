"""What a run says about itself: how long it will take (after its first step), the settings read back from
torch and the built objects (summary.json's "effective"), and its closing figures (ms/step, tok/s, MFU,
memory) in the summary and on the console."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

import torch

from gpt2.training import metrics
from gpt2.config import option_str as value
from gpt2.training.devices import enabled_sdpa_backends
from gpt2.training.optim import describe_optimizer, lr_at

if TYPE_CHECKING:
    from gpt2.training.run_state import Run

log = logging.getLogger("gpt2.training.loop")  # the loop's own logger: these lines belong to its run.log


LONG_RUN_S = 600  # a run expected to take longer is announced after its first step, with a quicker command


def say_how_long(run: Run, step_ms: float, steps_left: int) -> None:
    """After the first step: how long the rest will take, when that is long, and what to try instead on a CPU."""
    seconds = step_ms / 1000 * steps_left
    if seconds < LONG_RUN_S:
        return
    hours, minutes = divmod(round(seconds / 60), 60)
    message = (f"at {step_ms / 1000:.1f} s per step, the {steps_left} steps left take about "
               + (f"{hours} h {minutes} min" if hours else f"{minutes} min") + f" on {run.device.type}")
    if run.slow_here:
        message += (f"; to try this stage quickly on this machine: python run.py +stage={run.cfg.stage.name} "
                    "model=tiny train.device=cpu train.steps=20")
    log.warning(message)


def effective_settings(run: Run) -> dict:
    """The settings read back from torch and the built objects, not copied from the config."""
    cfg, device = run.cfg, run.device
    compiled = ("torch._dynamo" in sys.modules
                and isinstance(run.model, sys.modules["torch._dynamo"].eval_frame.OptimizedModule))
    effective = {
        "matmul_precision": torch.get_float32_matmul_precision(),
        "tf32": device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32,
        "autocast_dtype": None if run.effective_autocast in (None, "none") else run.effective_autocast,
        "attention": run.raw_model.attention,
        "sdpa_backends": enabled_sdpa_backends() if device.type == "cuda" else None,
        "loss": run.raw_model.config.loss,
        "vocab_size": run.raw_model.lm_head.weight.shape[0],
        "optimizer": describe_optimizer(run.optimizer),
        "lr_schedule": {"name": value(cfg.optim.schedule), "first_lr": lr_at(0, cfg.optim, cfg.train.steps),
                        "last_lr": run.optimizer.param_groups[0]["lr"], "warmup_steps": cfg.optim.warmup_steps,
                        "decay_steps": cfg.train.steps},
        "grad_clip": cfg.optim.grad_clip,
        "grad_accum_steps": run.grad_accum,
        "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "ddp": None if run.ddp_model is None else {
            "gradient_as_bucket_view": run.ddp_model.gradient_as_bucket_view,
            "broadcast_buffers": getattr(run.ddp_model, "forward_sync_buffers",
                                         getattr(run.ddp_model, "broadcast_buffers", None))},
        "compiled": compiled,
        # train.compile_options as the compiled module's Inductor config holds them, not as asked
        "compile_options": ({k: run.model.get_compiler_config()[k.replace("-", "_")] for k in cfg.train.compile_options}
                            if compiled and cfg.train.compile_options else None),
        "notes": [],
    }
    if device.type != "cuda" and effective["matmul_precision"] == "high":
        effective["notes"].append(f"matmul_precision={effective['matmul_precision']} selects TF32 tensor cores, "
                                  f"which {device.type} does not have: no effect here")
    if value(cfg.train.sdpa_backend) != "auto" and device.type != "cuda":
        effective["notes"].append(f"sdpa_backend={value(cfg.train.sdpa_backend)} chooses among CUDA kernels: "
                                  f"no effect on {device.type}")
    if run.effective_autocast == "none" and run.bf16:
        effective["notes"].append("autocast was requested but torch reported it disabled")
    return effective


def summarise(run: Run, summary: dict, step_ms: list) -> None:
    """Timing medians, tok/s, MFU and peak memory into the summary, and the closing console line."""
    T, W = run.seq_len, run.ranks.world_size
    summary.update(metrics.peak_memory(run.device))  # before the peak is measured again: not the run's memory
    if step_ms:
        median, low, high, n = metrics.steady_state(step_ms, run.cfg.train.timing_skip)
        tokens_per_sec = run.total_batch / (median / 1000)
        peak, source = summary["mfu_peak_tflops"], summary["mfu_peak_source"]
        if source == "measured":  # measured again at the end; the better of the two (a busy machine only lowers it)
            peak = max(peak, metrics.peak_tflops(run.device, summary["compute_dtype"], run.matmul_shapes)[0])
        utilisation = metrics.mfu(run.raw_model.flops_per_token(T), tokens_per_sec, W, peak)
        summary.update(ms_per_step=median, ms_per_step_min=low, ms_per_step_max=high, steps_measured=n,
                       tokens_per_sec=tokens_per_sec, mfu=utilisation, mfu_peak_tflops=peak,
                       mfu_note=metrics.mfu_note(utilisation, source))
        if summary["mfu_note"] and run.ranks.is_main:
            log.warning(f"mfu: {summary['mfu_note']} (summary.json keeps the figure, with mfu_note)")
    if run.tracker:
        run.tracker.finish(summary)
    if run.ranks.is_main and summary.get("ms_per_step"):
        mem = summary["peak_mem_gib"] or 0
        reserved = summary.get("peak_mem_reserved_gib")
        log.info(f"{summary['stage']}: {summary['ms_per_step']:.2f} ms/step (median of {summary['steps_measured']}), "
                 f"{summary['tokens_per_sec']:,.0f} tok/s, mfu {metrics.mfu_text(summary['mfu'], 1)}, peak memory "
                 f"{mem:.2f} GiB ({summary['peak_mem_kind']})" + (f", {reserved:.2f} GiB reserved" if reserved else "")
                 + f", final loss {summary['final_loss']:.4f}")
