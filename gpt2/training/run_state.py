"""One training run's state and the work it does besides the step: validation, samples, checkpoints, and the
record of every event. loop.py builds a Run (set_up) and drives it (the loop); summary.py reads
it back for summary.json.

`Run.record(event, line)` is the one way an event leaves the run: the console and run.log (its line),
metrics.jsonl, and wandb, on rank 0 only. `due(every, steps_done)` is the one cadence test (val_every,
sample_every, hellaswag_every, checkpoint_every).
"""

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from gpt2 import distributed
from gpt2.training import checkpoint
from gpt2.training import metrics
from gpt2.data.batches import TokenLoader
from gpt2.model.gpt import GPT
from gpt2.training.tracking import WandbRun

log = logging.getLogger("gpt2.training.loop")  # the loop's logger: its lines make the run's run.log


def due(every: Optional[int], steps_done: int) -> bool:
    """Whether something done every `every` optimizer steps (0 or None: never) is due after `steps_done`."""
    return bool(every) and steps_done % every == 0


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
    # how far the loop got: what summary.json reports whatever stops it
    steps_done: int = 0
    last_loss: Optional[float] = None
    val_loss: Optional[float] = None
    step_ms: List[float] = field(default_factory=list)

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

    def record(self, event: dict, line: Optional[str] = None, track: bool = True) -> None:
        """One event of the run to the console and run.log (`line`), metrics.jsonl and, unless `track` is off,
        wandb; on rank 0 only (the other ranks have no step log)."""
        if not self.step_log:
            return
        if line:
            log.info(line)
        self.step_log.append(event)
        if track and self.tracker:
            self.tracker.log(event)

    def record_step(self, record: dict) -> None:
        """A step's console line and metrics.jsonl row (metrics.StepLog's format), and to wandb with its MFU."""
        if self.step_log:
            utilisation = self.step_log.step(record, self.ranks.world_size)
            self.tracker.log({**record, "mfu": utilisation})

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
        from gpt2.tokenizer import decode, encode

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
        self.record({"step": step, "samples": texts}, track=False)
        return texts

    def validate(self, step: int) -> Optional[float]:
        t = self.cfg.train
        if self.ranks.is_main and self.slow_here:  # a log file gets no progress bar: say why nothing moves
            log.info(f"validating on {t.val_batches} held-out batches of {self.batch_size}x{self.seq_len} "
                     f"(minutes on a {self.device.type} at this size)")
        val = evaluate(self.raw_model, self.val_tokens, self.batch_size, self.seq_len, t.val_batches, self.autocast,
                       self.ranks, self.device)
        if val is not None:
            self.record({"step": step, "val_loss": val}, f"step {step:5d} | val loss {val:.6f}")
        if val is None and self.val_note is None:  # said once, in the log and in summary.json
            self.val_note = (f"no validation: the held-out split ({len(self.val_tokens):,} tokens, "
                             f"data.val_fraction={self.cfg.data.val_fraction}) is shorter than one sequence of "
                             f"{self.seq_len + 1} tokens; raise data.val_fraction or lower train.seq_len")
            if self.ranks.is_main:
                log.warning(self.val_note)
        return val
