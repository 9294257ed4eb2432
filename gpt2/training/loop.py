"""The training loop, top to bottom: set-up (torch flags, data, model, optimizer), one step, what is due after
it, and the end of the run.

`train(cfg, run_dir, summary)` runs one job of a config composed by Hydra (converted once to its typed,
checked form: gpt2.config.as_config). It fills `summary` as it
learns things, so whatever stops it (bad input, out of memory, Ctrl-C, a NaN) leaves a summary that says
how far it got; the entrypoint (gpt2/runs/job.py) writes it. The run's state and its events live in
run_state.py, the stop signals in stop_signals.py, the closing figures in summary.py (all in gpt2/training/).
"""

import contextlib
import inspect
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2 import distributed
from gpt2.training import checkpoint
from gpt2.training import metrics
from gpt2.training.checks import check_compile, check_config, check_sizes
from gpt2.config import TrainConfig, as_config, plain
from gpt2.config import option_str as value
from gpt2.data.batches import build_data
from gpt2.training.devices import configure_torch, resolve_device
from gpt2.errors import UsageError
from gpt2.model.gpt import GPT
from gpt2.training.optim import build_optimizer, grad_norm_and_clip, lr_at, set_lr
from gpt2.training.summary import effective_settings, say_how_long, summarise
from gpt2.training.stop_signals import StopFlag
from gpt2.summary_schema import RunSummary
from gpt2.training.tracking import WandbRun
from gpt2.training.run_state import Run, due

log = logging.getLogger("gpt2.training.loop")


# ---- set-up ---------------------------------------------------------------------------------------

def build_model(model_cfg, gpt_config, device: torch.device) -> GPT:
    """The model of the run's `model` section: `gpt_config` from scratch, or model.init_from's weights."""
    if model_cfg.init_from == "scratch":
        return GPT(gpt_config).to(device)
    try:
        model = GPT.from_pretrained(model_cfg.init_from, vocab_size=gpt_config.vocab_size,
                                    attention=gpt_config.attention)
    except ValueError as e:  # another architecture, or a GPT-2 with weights missing
        raise UsageError(f"model.init_from={model_cfg.init_from}: {e}; give a GPT-2 checkpoint (a hub name "
                         "gpt2 ... gpt2-xl, or a folder written by transformers)") from None
    except OSError as e:
        raise UsageError(f"model.init_from={model_cfg.init_from}: could not load Hugging Face weights "
                         f"({str(e).splitlines()[0]}); give a hub name (gpt2 ... gpt2-xl) with network "
                         "access, or a folder written by transformers") from None
    return model.to(device)


def wrap_model(raw_model: GPT, train_cfg: TrainConfig, ranks, device: torch.device):
    """(model, ddp_model): the module the steps call, wrapped for data parallelism (DDP) and for speed (compile),
    and the DDP wrapper (None in a single process); raw_model stays what is saved and evaluated."""
    ddp_model = None
    if ranks.world_size > 1:
        # gradients as views of DDP's buckets: no second copy of them (about 0.5 GB for 124M); the only
        # buffers are the constant causal masks, so there is nothing to broadcast before each forward
        # (torch 2.13 renamed broadcast_buffers to forward_sync_buffers)
        no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else "broadcast_buffers": False}
        ddp_model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None,
                        gradient_as_bucket_view=True, **no_sync)
    model = ddp_model or raw_model
    if train_cfg.compile:
        model = torch.compile(model, options=dict(train_cfg.compile_options) or None)
    return model, ddp_model


def set_up(cfg, run_dir: Path, summary: dict) -> Run:
    """Device, torch flags, checked config, data, model (wrapped for DDP and compile), optimizer, resume.
    `cfg`: the composed config (or its typed form); what runs reads the typed, checked one (Run.cfg)."""
    config = as_config(cfg)
    t, ranks = config.train, distributed.ranks_from_env()
    device = resolve_device(value(t.device), ranks)
    summary.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
                   device_type=device.type, world_size=ranks.world_size)
    configure_torch(t, device)
    gpt_config = check_config(config, ranks)
    if t.compile:
        check_compile(t, device)
    distributed.init_process_group(ranks, value(t.ddp_backend), device)

    # data: every rank reads its own share of the same chunks a single process would read
    B, T, W = t.batch_size, t.seq_len or gpt_config.block_size, ranks.world_size
    total_batch = t.total_batch_size or B * T * W
    if t.hellaswag_every:  # the rows in-loop evaluations need: a missing file fails before the first step
        from gpt2.evaluation.hellaswag import examples_for_training
        examples_for_training(t)
    train_loader, val_tokens = build_data(config.data, B, T, ranks.rank, W, vocab_size=gpt_config.tokenizer_vocab_size)
    summary.update(batch_size=B, seq_len=T, tokens_per_step=total_batch, grad_accum_steps=total_batch // (B * T * W))

    raw_model = build_model(config.model, gpt_config, device)
    if config.model.init_from != "scratch":  # the weights' context, known only now
        check_sizes(t, raw_model.config.block_size, W, from_weights=True)
    model, ddp_model = wrap_model(raw_model, t, ranks, device)
    run = Run(cfg=config, run_dir=run_dir, ranks=ranks, device=device, raw_model=raw_model, model=model,
              ddp_model=ddp_model, optimizer=build_optimizer(raw_model, config.optim, device),
              train_loader=train_loader, val_tokens=val_tokens, batch_size=B, seq_len=T, total_batch=total_batch,
              grad_accum=total_batch // (B * T * W), bf16=value(t.autocast_dtype) == "bf16",
              config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
              model_shape={k: getattr(raw_model.config, k) for k in
                           ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")})
    resume(run, summary)
    prepare_measurements(run, summary)
    return run


def resume(run: Run, summary: dict) -> None:
    """train.resume: the weights, optimizer and data position of a checkpoint, into this run."""
    t = run.cfg.train
    source = checkpoint.resume_source(t.resume, run.run_dir)
    if source:
        summary.update(checkpoint.resume_into(source, model=run.raw_model, optimizer=run.optimizer,
                                              loader=run.train_loader, model_shape=run.model_shape,
                                              config_yaml=run.config_yaml, device=run.device))
        log.info(f"resumed from {summary['resumed_from']} at step {summary['start_step']}")
    if t.resume == checkpoint.RESUME_AUTO:  # going on in this folder: its checkpoint is this run's own
        run.saved_step = summary.get("start_step") if source else None
        if run.ranks.is_main:
            checkpoint.forget_steps_from(run.run_dir / "metrics.jsonl", summary.get("start_step", 0))
    run.steps_done = summary.get("start_step", 0)


def prepare_measurements(run: Run, summary: dict) -> None:
    """What the steps are measured with: the autocast read back from torch, the MFU peak, the step log and
    wandb on the main process; the closing line of the set-up."""
    config, device, raw_model, T = run.cfg, run.device, run.raw_model, run.seq_len
    with run.autocast():  # what the steps will run in, read back from torch inside the same region
        run.effective_autocast = (str(torch.get_autocast_dtype(device.type)).removeprefix("torch.")
                                  if torch.is_autocast_enabled(device.type) else "none")
    dtype = metrics.compute_dtype(device, run.bf16)
    run.matmul_shapes = metrics.model_matmul_shapes(run.batch_size * T, raw_model.config.n_embd,
                                                    raw_model.lm_head.weight.shape[0], device)
    peak, peak_source = metrics.peak_tflops(device, dtype, run.matmul_shapes)
    if run.ranks.is_main:
        run.step_log = metrics.StepLog(run.run_dir, log, raw_model.flops_per_token(T), peak)
        run.tracker = WandbRun(config.logger.wandb, config.stage.name, plain(config), run.run_dir,
                               resume_id=summary.get("resumed_wandb_id"))
        summary["wandb_run_id"] = run.tracker.id  # a run that resumes this one continues its wandb run
    summary.update(compute_dtype=dtype, mfu_peak_tflops=peak, mfu_peak_source=peak_source, mfu_note=None,
                   params=raw_model.num_params(non_embedding=False), model_shape=run.model_shape)
    o, t = config.optim, config.train
    if value(o.schedule) == "cosine" and 0 < t.steps <= o.warmup_steps and run.ranks.is_main:
        log.warning(f"optim.warmup_steps={o.warmup_steps} is not shorter than train.steps={t.steps}: "
                    "the learning rate never reaches optim.lr (fine for a timing run, not for training)")
    if run.ranks.is_main:
        log.info(f"{summary['stage']}: {summary['params']:,} parameters on {summary['device']} "
                 f"x{run.ranks.world_size}, B={run.batch_size} T={T}, {run.total_batch:,} tokens/step = "
                 f"{run.grad_accum} micro-step(s)")


def train_step(run: Run, step: int) -> dict:
    """One optimizer step of `grad_accum` micro-steps; its metrics.jsonl record (loss, norm, ms, ...)."""
    metrics.synchronize(run.device)
    t0 = time.perf_counter()
    lr = lr_at(step, run.cfg.optim, run.cfg.train.steps)
    set_lr(run.optimizer, lr)
    run.optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=run.device)
    for micro in run.micro_steps():
        x, y = (t.to(run.device, non_blocking=True) for t in run.train_loader.next_batch())
        # DDP all-reduces gradients only on the last micro-step; the others just accumulate
        last = micro == run.grad_accum - 1
        with contextlib.nullcontext() if run.ddp_model is None or last else run.ddp_model.no_sync():
            with run.autocast():
                # [1]: the (B, T, vocab) logits are not held through backward (1.5 GiB at B=16 in bf16)
                loss = run.model(x, y)[1] / run.grad_accum  # the gradient of the mean over the whole batch
            loss_accum += loss.detach()
            loss.backward()
            del loss
    distributed.all_reduce_mean(loss_accum)
    norm = grad_norm_and_clip(run.raw_model.parameters(), run.cfg.optim.grad_clip)
    run.optimizer.step()
    metrics.synchronize(run.device)
    ms = (time.perf_counter() - t0) * 1000
    return {"step": step, "loss": loss_accum.item(), "lr": lr, "grad_norm": norm.item(), "ms": ms,
            "tokens_per_sec": run.total_batch / (ms / 1000)}


def stop_diverged(run: Run, record: dict, summary: dict) -> str:
    """A step whose loss or gradient norm is not finite ruined the weights: say so, keep the last checkpoint."""
    step = record["step"]
    what = (f"loss became {record['loss']}" if not math.isfinite(record["loss"])
            else f"gradient norm became {record['grad_norm']}")
    kept = f"; the last good checkpoint (step {run.saved_step}) is kept in {run.run_dir}" if run.saved_step else ""
    summary.update(diverged_at_step=step, error=f"{what} at step {step}; lower optim.lr or turn on "
                                                f"optim.grad_clip{kept}")
    log.error(summary["error"])
    return "diverged"


def after_step(run: Run, record: dict, summary: dict) -> None:
    """A finished step: its record, then whatever is due after it (validation, samples, HellaSwag, checkpoint)."""
    t, done, step = run.cfg.train, run.steps_done, record["step"]
    run.last_loss = record["loss"]
    run.step_ms.append(record["ms"])
    if len(run.step_ms) == (2 if t.compile else 1) and run.ranks.is_main:  # the first step a clock can trust
        say_how_long(run, record["ms"], t.steps - done)
    run.record_step(record)
    if due(t.val_every, done) and done < t.steps:  # the last step's validation is the final one (finish)
        run.val_loss = run.validate(step)
    if due(t.sample_every, done) and run.ranks.is_main:
        run.sample(step)
    if t.hellaswag_every and (due(t.hellaswag_every, done) or done == t.steps):
        from gpt2.evaluation.hellaswag import evaluate_in_run  # acc_norm on the plain module, rows shared by ranks
        summary.update(evaluate_in_run(run, step))
    if due(t.checkpoint_every, done):
        run.save(done)


def finish(run: Run, status: str, stop: StopFlag, summary: dict) -> str:
    """The end of the steps: after all of them, the final validation and the model kept; after a stop signal
    (then, or during that validation), a checkpoint to resume from. The run's final status."""
    t = run.cfg.train
    if status == "ok":
        # still under StopFlag: a signal now lets the validation finish, then saves below
        run.val_loss = run.validate(max(run.steps_done - 1, 0))
        # a single run keeps its final model (for gpt2.sample, gpt2.evaluate, fine-tuning); the jobs of a
        # sweep are measurements, and keep one only when asked (train.checkpoint_every)
        if t.checkpoint_every or summary.get("job_num") is None:
            run.save(run.steps_done)
        elif run.ranks.is_main and t.save_checkpoints:
            log.info("no checkpoint kept: a sweep's jobs keep one only with train.checkpoint_every=N")
        if distributed.any_rank(stop.requested, run.device):  # every rank decides alike
            status = "interrupted"
    if status == "interrupted":
        save_on_stop(run, summary)
    return status


def save_on_stop(run: Run, summary: dict) -> None:
    """Stopped by a signal: a checkpoint of the steps done, then the summary's line on how to go on."""
    t, done = run.cfg.train, run.steps_done
    if done > summary.get("start_step", 0):
        run.save(done)
    if torch.distributed.is_initialized():  # no rank exits before rank 0's checkpoint is whole: the first
        torch.distributed.barrier()         # exit may end the others (srun --kill-on-bad-exit, torchrun)
    again = ("the same command continues it (train.resume=auto)" if t.resume == checkpoint.RESUME_AUTO
             else f"resume with train.resume={run.run_dir}")
    summary["error"] = f"stopped by a signal after {done} of {t.steps} steps" + (
        f"; {again}" if run.saved_step == done else
        " (train.save_checkpoints=false: no checkpoint was written)" if not t.save_checkpoints else "")
    log.warning(summary["error"])


def train(cfg, run_dir: Path, summary: RunSummary) -> RunSummary:
    run = set_up(cfg, run_dir, summary)
    status = "ok"
    with StopFlag() as stop:
        for step in range(run.steps_done, run.cfg.train.steps):
            record = train_step(run, step)
            if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
                status = stop_diverged(run, record, summary)
                break
            run.steps_done = step + 1
            after_step(run, record, summary)
            if distributed.any_rank(stop.requested, run.device):
                status = "interrupted"
                break
        status = finish(run, status, stop, summary)
    summary.update(status=status, steps=run.steps_done, final_loss=run.last_loss, val_loss=run.val_loss,
                   val_note=run.val_note, effective=effective_settings(run))
    summarise(run, summary, run.step_ms)
    return summary
