"""summary.json, declared: every key a run writes, its type and what it means. Torch-free, for the report too.

The job (gpt2/runs/job.py) makes the summary when a run starts, the loop (gpt2/training/loop.py, summary.py) fills
it in as it learns things, and the job writes it at the end, whatever stopped the run; the report
(gpt2/reporting/build.py), the bench (gpt2/bench.py) and the folder checks (gpt2/runs/folders.py) read it back.
A TypedDict, not a dataclass: the summary is written to disk at any moment of a run, half filled, and read
back as JSON by tools that know nothing of Python; a TypedDict states its keys for both sides (and for a type checker)
while the value stays the plain dict that json reads and writes. tests/test_summary_schema.py holds real runs to it:
a key not declared here, or a value of another type, fails there.
"""

from typing import Dict, List, Optional, TypedDict


class RunSummary(TypedDict, total=False):
    # what ran, and how it ended
    stage: str  # conf/stage/<name>.yaml's stage.name
    adds: Optional[str]  # the stage's own one-line description (stage.adds)
    status: str  # running, ok, failed, diverged, interrupted (a reader adds incomplete / unreadable)
    error: Optional[str]  # one line: why it failed or stopped, and what to do
    exit_code: Optional[int]  # 0 ok, 2 bad input, 1 anything else
    diverged_at_step: int  # the step whose loss or gradient norm was not finite
    # where it ran
    device: Optional[str]  # the GPU's name, or "cpu" / "mps"
    device_type: Optional[str]  # cuda, cpu, mps
    torch_version: str
    cuda_version: Optional[str]
    host: str
    gpus: Optional[str]  # the GPUs the scheduler gave the job (SLURM's ids, CUDA_VISIBLE_DEVICES), else None
    world_size: int  # processes (torchrun)
    # the sizes of a step
    model: str  # the model preset (conf/model/<name>.yaml)
    params: int  # every parameter, the token table included
    model_shape: Dict[str, int]  # n_layer, n_head, n_embd, block_size, vocab_size
    batch_size: int  # micro-batch B
    seq_len: Optional[int]  # T (None until set-up: the model's context)
    tokens_per_step: Optional[int]  # B x T x world x micro-steps
    grad_accum_steps: Optional[int]  # micro-steps per optimizer step
    # the steps
    start_step: int  # 0, or the step a resumed run went on from
    resumed_from: Optional[str]  # the checkpoint it resumed from
    resumed_wandb_id: Optional[str]  # the wandb run of the checkpoint it resumed from
    wandb_run_id: Optional[str]
    steps: int  # optimizer steps done (of train.steps)
    steps_measured: int  # the steady-state steps ms_per_step is the median of
    ms_per_step: Optional[float]  # median of the steady-state step times
    ms_per_step_min: Optional[float]
    ms_per_step_max: Optional[float]
    tokens_per_sec: Optional[float]  # tokens_per_step / ms_per_step
    compute_dtype: Optional[str]  # the matmuls' dtype: float32, tf32, bfloat16
    mfu: Optional[float]  # model FLOPs utilisation, a fraction of mfu_peak_tflops
    mfu_peak_tflops: Optional[float]
    mfu_peak_source: Optional[str]  # datasheet, or measured (on this machine: a CPU)
    mfu_note: Optional[str]  # why the mfu figure is not to be read as one (above a measured peak)
    peak_mem_gib: Optional[float]  # peak allocated (GPU) or peak resident set (CPU)
    peak_mem_reserved_gib: Optional[float]  # what the caching allocator reserved (GPU only)
    device_mem_gib: Optional[float]  # the device's total memory (GPU only)
    peak_mem_kind: Optional[str]  # which figure peak_mem_gib is
    # the losses and evaluations
    final_loss: Optional[float]  # the last step's training loss
    val_loss: Optional[float]  # the last validation
    val_note: Optional[str]  # why there is no validation loss, when there is none
    hellaswag_acc_norm: float  # the last HellaSwag evaluation during training (train.hellaswag_every)
    hellaswag_acc: float
    hellaswag_n: int  # rows it scored
    # how to run it again
    job_num: Optional[int]  # the job's number in a sweep; None for a single run
    command: str  # the command as typed (python run.py ..., torchrun ..., a submitit job's own)
    overrides: List[str]  # Hydra's task overrides of this job
    started_at: str  # ISO 8601, UTC
    finished_at: Optional[str]
    config: dict  # the whole composed config, resolved
    effective: dict  # the settings read back from torch and the built objects (gpt2/training/summary.py)


FIELD_TYPES = RunSummary.__annotations__  # key -> its declared type


def number_type(key: str):
    """int or float when summary.json's `key` holds that number (or null), else None."""
    declared = FIELD_TYPES[key]
    base = [t for t in getattr(declared, "__args__", (declared,)) if t is not type(None)]
    return base[0] if len(base) == 1 and base[0] in (int, float) else None
