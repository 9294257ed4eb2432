"""The training loop, top to bottom: torch flags, data, model, optimizer, the steps, and the summary.

`train(cfg, run_dir, summary)` runs one job of a config composed by Hydra. It fills `summary` as it
learns things, so whatever stops it (bad input, out of memory, Ctrl-C, a NaN) leaves a summary that says
how far it got; the entrypoint writes it.
"""

import contextlib
import inspect
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from . import checkpoint, distributed, metrics
from .data import TokenLoader, build_data
from .config import option_str as value
from .errors import UsageError
from .job import JOB_STOP_SIGNALS
from .checks import check_config, check_sizes
from .devices import check_compiler, configure_torch, resolve_device
from .model import GPT
from .optim import build_optimizer, grad_norm_and_clip, lr_at, set_lr
from .run_summary import effective_settings, say_how_long, summarise
from .tracking import WandbRun

log = logging.getLogger("gpt2.train")


# ---- set-up ---------------------------------------------------------------------------------------

def build_model(cfg, gpt_config, device: torch.device, world_size: int = 1) -> GPT:
    if cfg.model.init_from == "scratch":
        model = GPT(gpt_config)
    else:
        try:
            model = GPT.from_pretrained(cfg.model.init_from, vocab_size=gpt_config.vocab_size,
                                        attention=gpt_config.attention)
        except ValueError as e:  # another architecture, or a GPT-2 with weights missing
            raise UsageError(f"model.init_from={cfg.model.init_from}: {e}; give a GPT-2 checkpoint (a hub name "
                             "gpt2 ... gpt2-xl, or a folder written by transformers)") from None
        except OSError as e:
            raise UsageError(f"model.init_from={cfg.model.init_from}: could not load Hugging Face weights "
                             f"({str(e).splitlines()[0]}); give a hub name (gpt2 ... gpt2-xl) with network "
                             "access, or a folder written by transformers") from None
        check_sizes(cfg, model.config.block_size, world_size)  # the weights' context, known only now
    return model.to(device)


STOP_SIGNALS = (signal.SIGINT, *JOB_STOP_SIGNALS)  # Ctrl-C, and the signals that stop a job (gpt2/job.py)


class StopFlag:
    """Ctrl-C, SIGTERM, SIGHUP, SIGUSR1 or SIGUSR2 asks the loop to stop after the current step (or the final
    validation) and save; a second Ctrl-C stops at once. Under torchrun the ranks agree (distributed.any_rank)
    after every step, so all stop at the same one, also when the signal reached only some of them."""

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
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


PROGRESS_DELAY_S = 5.0  # a progress bar appears only once its work has taken this long: none in tiny runs


def progress(iterable, description: str, ranks, unit: str):
    """`iterable` with a tqdm bar on rank 0's terminal, for work that can be silent for minutes (validating a
    large model on a CPU, the first step's compile and micro-steps). No bar when stderr is not a terminal (a
    pipe, a scheduler's log: tqdm's disable=None), so captured output and run.log keep one line per event;
    none for work done within PROGRESS_DELAY_S; leave=False wipes it when done, leaving the step lines."""
    return tqdm(iterable, desc=description, unit=unit, delay=PROGRESS_DELAY_S, leave=False, dynamic_ncols=True,
                disable=None if ranks.is_main else True)


@torch.no_grad()
def evaluate(model, tokens, batch_size: int, seq_len: int, batches: int, autocast, ranks,
             device) -> Optional[float]:
    """Mean loss over the first `batches` micro-batches of the held-out split (the same ones every time),
    shared among the ranks so that N processes see the batches one process would.

    `model` is the plain module, never the compiled or DDP wrapper: dynamo guards on grad mode and on
    `training`, so a compiled model evaluated under no_grad would compile a second graph (tens of seconds on
    a GPU, and memory) for a few batches; eager evaluation costs nothing to set up and gives the same loss.
    """
    batch_size = min(batch_size, (len(tokens) - 1) // seq_len)
    if batch_size < 1:
        return None  # held-out split shorter than one sequence
    description = f"validating {batches} batches"
    batches = max(1, math.ceil(batches / ranks.world_size))
    loader = TokenLoader(tokens, batch_size, seq_len, ranks.rank, ranks.world_size)
    model.eval()
    total = torch.zeros((), device=device)
    try:
        for _ in progress(range(batches), description, ranks, unit="batch"):
            x, y = (t.to(device) for t in loader.next_batch())
            with autocast():
                total += model(x, y)[1].float()  # [1]: the logits are not kept alive
    finally:
        model.train()
    return distributed.all_reduce_mean(total / batches).item()


# ---- the run: set-up, one step, the summary ---------------------------------------------------------

@dataclass
class Run:
    """What set-up builds and the steps use."""
    cfg: object
    run_dir: Path
    ranks: distributed.Ranks
    device: torch.device
    raw_model: GPT  # the plain module: what we save and evaluate
    model: torch.nn.Module  # what the steps call: raw_model, wrapped by DDP and/or torch.compile
    ddp_model: Optional[DDP]
    optimizer: torch.optim.Optimizer
    train_loader: TokenLoader
    val_tokens: torch.Tensor
    batch_size: int
    seq_len: int
    total_batch: int
    grad_accum: int
    bf16: bool
    config_yaml: str
    model_shape: dict
    step_log: Optional[metrics.StepLog] = None
    tracker: Optional[WandbRun] = None
    effective_autocast: Optional[str] = None  # read back from torch inside the first autocast region
    saved_step: Optional[int] = None
    val_note: Optional[str] = None  # why there is no validation loss, when there is none
    first_step_done: bool = False  # until then, the steps say what they do (see micro_steps)
    matmul_shapes: tuple = ()  # the model's matmuls a measured MFU peak is timed on (metrics.model_matmul_shapes)

    @property
    def slow_here(self) -> bool:
        """GPT-2-sized work (over 20M parameters) off a GPU: minutes where a GPU takes seconds."""
        return self.device.type != "cuda" and self.raw_model.num_params() > 20e6

    def micro_steps(self):
        """range(grad_accum); on the run's first step with a line saying the model compiles, and a progress
        bar over many micro-steps: compiling and 256 micro-steps kept that step silent for 5 minutes."""
        if self.first_step_done:
            return range(self.grad_accum)
        self.first_step_done = True
        if self.cfg.train.compile and self.ranks.is_main:
            log.info("compiling the model (the first step takes longer)")
        if self.grad_accum == 1:  # one micro-step: a bar could appear only once the step is over
            return range(1)
        return progress(range(self.grad_accum), "first step" + (" (compiling)" if self.cfg.train.compile else ""),
                        self.ranks, unit="micro-step")

    def autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def save(self, step: int) -> None:
        """A checkpoint after `step` optimizer steps (once per step; only rank 0 writes)."""
        if not self.cfg.train.save_checkpoints or step == self.saved_step:
            return
        if self.ranks.is_main:
            checkpoint.save_checkpoint(self.run_dir / checkpoint.CHECKPOINT_NAME, model=self.raw_model,
                                       optimizer=self.optimizer, step=step, data_state=self.train_loader.state_dict(),
                                       config_yaml=self.config_yaml, model_shape=self.model_shape, device=self.device,
                                       wandb_run_id=self.tracker.id if self.tracker else None)
        self.saved_step = step

    @torch.no_grad()
    def sample(self, step: int, count: int = 4, tokens: int = 32) -> list:
        """build-nanogpt's samples during training: `count` continuations of the prompt, top-k 50, from a
        generator of their own (the run's random numbers stay as they were), on the plain module."""
        from .tokenizer import decode, encode

        prompt = torch.tensor([encode(self.cfg.train.sample_prompt)] * count, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(42 + self.ranks.rank)
        self.raw_model.eval()
        try:
            with self.autocast():
                out = self.raw_model.generate(prompt, tokens, top_k=50, generator=generator)
        finally:
            self.raw_model.train()
        texts = [decode(row.tolist()) for row in out]
        for i, text in enumerate(texts):
            log.info(f"step {step:5d} | sample {i}: {text!r}")
        if self.step_log:
            self.step_log.append({"step": step, "samples": texts})
        return texts

    def validate(self, step: int) -> Optional[float]:
        t = self.cfg.train
        if self.ranks.is_main and self.slow_here:  # a log file gets no progress bar: say why nothing moves
            log.info(f"validating on {t.val_batches} held-out batches of {self.batch_size}x{self.seq_len} "
                     f"(minutes on a {self.device.type} at this size)")
        val = evaluate(self.raw_model, self.val_tokens, self.batch_size, self.seq_len, t.val_batches, self.autocast,
                       self.ranks, self.device)
        if self.step_log and val is not None:
            log.info(f"step {step:5d} | val loss {val:.6f}")
            self.step_log.append({"step": step, "val_loss": val})
            self.tracker.log({"step": step, "val_loss": val})
        if val is None and self.val_note is None:  # said once, in the log and in summary.json
            self.val_note = (f"no validation: the held-out split ({len(self.val_tokens):,} tokens, "
                             f"data.val_fraction={self.cfg.data.val_fraction}) is shorter than one sequence of "
                             f"{self.seq_len + 1} tokens; raise data.val_fraction or lower train.seq_len")
            if self.ranks.is_main:
                log.warning(self.val_note)
        return val


def set_up(cfg, run_dir: Path, summary: dict) -> Run:
    """Device, torch flags, checked config, data, model (wrapped for DDP and compile), optimizer, resume."""
    ranks = distributed.ranks_from_env()
    device = resolve_device(value(cfg.train.device), ranks)
    summary.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
                   device_type=device.type, world_size=ranks.world_size)
    configure_torch(cfg, device)
    gpt_config = check_config(cfg, ranks)
    if cfg.train.compile:
        check_compiler(device)
    distributed.init_process_group(ranks, value(cfg.train.ddp_backend), device)

    # data: every rank reads its own share of the same chunks a single process would read
    B, T, W = cfg.train.batch_size, cfg.train.seq_len or gpt_config.block_size, ranks.world_size
    total_batch = cfg.train.total_batch_size or B * T * W
    grad_accum = total_batch // (B * T * W)
    train_loader, val_tokens = build_data(cfg, B, T, ranks.rank, W, vocab_size=gpt_config.tokenizer_vocab_size)
    summary.update(batch_size=B, seq_len=T, tokens_per_step=total_batch, grad_accum_steps=grad_accum)

    # model, wrapped for data parallelism (DDP) and for speed (compile); raw_model is what we save
    raw_model = build_model(cfg, gpt_config, device, W)
    model = ddp_model = None
    if W > 1:
        # gradients as views of DDP's buckets: no second copy of them (about 0.5 GB for 124M); the only
        # buffers are the constant causal masks, so there is nothing to broadcast before each forward
        # (torch 2.13 renamed broadcast_buffers to forward_sync_buffers)
        no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else "broadcast_buffers": False}
        model = ddp_model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None,
                                gradient_as_bucket_view=True, **no_sync)
    model = model or raw_model
    if cfg.train.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(raw_model, cfg.optim, device)
    run = Run(cfg=cfg, run_dir=run_dir, ranks=ranks, device=device, raw_model=raw_model, model=model,
              ddp_model=ddp_model, optimizer=optimizer, train_loader=train_loader, val_tokens=val_tokens,
              batch_size=B, seq_len=T, total_batch=total_batch, grad_accum=grad_accum,
              bf16=value(cfg.train.autocast_dtype) == "bf16", config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
              model_shape={k: getattr(raw_model.config, k) for k in
                           ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")})
    resume = checkpoint.resume_source(cfg.train.resume, run_dir)
    if resume:
        summary.update(checkpoint.resume_into(resume, model=raw_model, optimizer=optimizer,
                                              loader=train_loader, model_shape=run.model_shape,
                                              config_yaml=run.config_yaml, device=device))
        log.info(f"resumed from {summary['resumed_from']} at step {summary['start_step']}")
    if cfg.train.resume == checkpoint.RESUME_AUTO:  # going on in this folder: its checkpoint is this run's own
        run.saved_step = summary.get("start_step") if resume else None
        if ranks.is_main:
            checkpoint.forget_steps_from(run_dir / "metrics.jsonl", summary.get("start_step", 0))

    dtype = metrics.compute_dtype(device, run.bf16)
    run.matmul_shapes = metrics.model_matmul_shapes(B * T, raw_model.config.n_embd, raw_model.lm_head.weight.shape[0],
                                                    device)
    peak, peak_source = metrics.peak_tflops(device, dtype, run.matmul_shapes)
    if ranks.is_main:
        run.step_log = metrics.StepLog(run_dir, log, raw_model.flops_per_token(T), peak)
        run.tracker = WandbRun(cfg, run_dir, resume_id=summary.get("resumed_wandb_id"))
        summary["wandb_run_id"] = run.tracker.id  # a run that resumes this one continues its wandb run
    summary.update(compute_dtype=dtype, mfu_peak_tflops=peak, mfu_peak_source=peak_source, mfu_note=None,
                   params=raw_model.num_params(non_embedding=False), model_shape=run.model_shape)
    if value(cfg.optim.schedule) == "cosine" and 0 < cfg.train.steps <= cfg.optim.warmup_steps and ranks.is_main:
        log.warning(f"optim.warmup_steps={cfg.optim.warmup_steps} is not shorter than train.steps={cfg.train.steps}: "
                    "the learning rate never reaches optim.lr (fine for a timing run, not for training)")
    if ranks.is_main:
        log.info(f"{summary['stage']}: {summary['params']:,} parameters on {summary['device']} x{W}, "
                 f"B={B} T={T}, {total_batch:,} tokens/step = {grad_accum} micro-step(s)")
    return run


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
                if run.effective_autocast is None:  # read back from torch, inside the region
                    run.effective_autocast = (str(torch.get_autocast_dtype(run.device.type)).removeprefix("torch.")
                                              if torch.is_autocast_enabled(run.device.type) else "none")
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


def train(cfg, run_dir: Path, summary: dict) -> dict:
    run = set_up(cfg, run_dir, summary)
    step_ms, last_loss, val_loss = [], None, None
    status, steps_done = "ok", summary.get("start_step", 0)
    with StopFlag() as stop:
        for step in range(steps_done, cfg.train.steps):
            record = train_step(run, step)
            if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
                status = "diverged"  # this step's update ruined the weights: stop, keep the last checkpoint
                what = (f"loss became {record['loss']}" if not math.isfinite(record["loss"])
                        else f"gradient norm became {record['grad_norm']}")
                kept = f"; the last good checkpoint (step {run.saved_step}) is kept in {run_dir}" \
                    if run.saved_step else ""
                summary.update(diverged_at_step=step, error=f"{what} at step {step}; lower optim.lr or turn on "
                               f"optim.grad_clip{kept}")
                log.error(summary["error"])
                break
            last_loss, steps_done = record["loss"], step + 1
            step_ms.append(record["ms"])
            if len(step_ms) == (2 if cfg.train.compile else 1) and run.ranks.is_main:
                say_how_long(run, record["ms"], cfg.train.steps - steps_done)
            if run.step_log:
                utilisation = run.step_log.step(record, run.ranks.world_size)
                run.tracker.log({**record, "mfu": utilisation})
            if cfg.train.val_every and steps_done % cfg.train.val_every == 0 and steps_done < cfg.train.steps:
                val_loss = run.validate(step)
            if cfg.train.sample_every and steps_done % cfg.train.sample_every == 0 and run.ranks.is_main:
                run.sample(step)
            if cfg.train.hellaswag_every and (steps_done % cfg.train.hellaswag_every == 0
                                              or steps_done == cfg.train.steps):
                from .hellaswag import evaluate_in_run  # HellaSwag acc_norm on the plain module, rows shared by ranks
                summary.update(evaluate_in_run(run, step))
            if cfg.train.checkpoint_every and steps_done % cfg.train.checkpoint_every == 0:
                run.save(steps_done)
            if distributed.any_rank(stop.requested, run.device):
                status = "interrupted"
                break
        stopping = status == "interrupted"
        if status == "ok":
            # still under StopFlag: a signal now lets the validation finish, then saves below
            val_loss = run.validate(max(steps_done - 1, 0))
            # a single run keeps its final model (for gpt2.sample, gpt2.evaluate, fine-tuning); the jobs of a
            # sweep are measurements, and keep one only when asked (train.checkpoint_every)
            if cfg.train.checkpoint_every or summary.get("job_num") is None:
                run.save(steps_done)
            elif run.ranks.is_main and cfg.train.save_checkpoints:
                log.info("no checkpoint kept: a sweep's jobs keep one only with train.checkpoint_every=N")
            stopping = distributed.any_rank(stop.requested, run.device)  # every rank decides alike
        if stopping:
            status = "interrupted"
            if steps_done > summary.get("start_step", 0):
                run.save(steps_done)
            if torch.distributed.is_initialized():  # no rank exits before rank 0's checkpoint is whole: the first
                torch.distributed.barrier()         # exit may end the others (srun --kill-on-bad-exit, torchrun)
            again = ("the same command continues it (train.resume=auto)" if cfg.train.resume == checkpoint.RESUME_AUTO
                     else f"resume with train.resume={run_dir}")
            summary["error"] = f"stopped by a signal after {steps_done} of {cfg.train.steps} steps" + (
                f"; {again}" if run.saved_step == steps_done else
                " (train.save_checkpoints=false: no checkpoint was written)" if not cfg.train.save_checkpoints
                else "")
            log.warning(summary["error"])
    summary.update(status=status, steps=steps_done, final_loss=last_loss, val_loss=val_loss, val_note=run.val_note,
                   effective=effective_settings(run))
    summarise(run, summary, step_ms)
    return summary
