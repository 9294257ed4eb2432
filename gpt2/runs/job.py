"""One Hydra job: the run folder, summary.json, and what happens when a job goes wrong.

A multirun runs every job in this one process, and Hydra skips its end-of-sweep hook (our report) when
a job raises. So a job never raises: it records its failure in summary.json, the sweep goes on, and the
process exits non-zero at the end (`exit_code`).
"""

import datetime
import json
import logging
import math
import os
import re
import shlex
import socket
import sys
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gpt2 import distributed
from gpt2.training.checkpoint import RESUME_AUTO
from gpt2.files import atomic_write_bytes
from gpt2.config import register_configs
from gpt2.errors import UsageError
from gpt2.runs.folders import _summary_in, finished_run_note
from gpt2.training.stop_signals import sigterm_stops_at_once
from gpt2.summary_schema import RunSummary

log = logging.getLogger("gpt2.runs.job")

_failures = []  # (stage, status, exit code) of this process's jobs that did not end ok
_failed_dirs = set()  # their run folders, so that reading a sweep's summaries back counts each job once
_sweep_interrupted = False  # after a Ctrl-C the rest of a sweep is skipped, but the report is still written

register_configs()  # the schema and the resolvers, for the tests and tools that import this module


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line() -> str:
    """The command as the user typed it, to re-run it: `python run.py ...`, or under torchrun torchrun's
    whole command with its own flags (--standalone, --nnodes, rendezvous), read from the torchrun process."""
    typed = distributed.torchrun_command()
    if typed:
        return shlex.join(typed)
    if os.environ.get("SUBMITIT_FOLDER"):  # set by submitit in its job process only
        return shlex.join(submitted_command())
    ranks = distributed.ranks_from_env()
    argv = [a for a in sys.argv if a not in distributed.hydra_overrides_for_rank(ranks)]
    script = not argv[0].endswith(".py")  # an installed command (gpt2-train), typed by its name, not via python
    if script:
        argv[0] = os.path.basename(argv[0])
    launcher = ([] if script else ["python"]) if ranks.world_size == 1 else \
        ["torchrun", f"--nproc_per_node={ranks.world_size}"] + (["--no-python"] if script else [])
    return shlex.join(launcher + argv)


def submitted_command() -> list:
    """This job's command under Hydra's submitit launcher, whose job process is submitit's own (`python -m
    submitit.core._submit FOLDER`: its argv says nothing to a user). Hydra's config keeps what was typed: the
    launcher and sweep settings (hydra.overrides.hydra) and this job's own values (hydra.overrides.task, the
    swept ones resolved), which re-run this one job as a one-job sweep under the same launcher. The script is
    named after the job (Hydra names it after the script: run.py), run from the folder it was submitted from;
    hydra.mode=MULTIRUN is Hydra's own record of the -m."""
    hydra_cfg = HydraConfig.get()
    typed = [o for o in hydra_cfg.overrides.hydra if not o.startswith("hydra.mode=")]
    return ["python", f"{hydra_cfg.job.name}.py", "-m", *typed, *hydra_cfg.overrides.task]


def strict_json_value(value):
    """The value with every non-finite float as its string ("nan", "inf"): JSON has no NaN, and jq,
    browsers and most readers refuse the NaN that Python's json would write (e.g. optim.lr=nan, refused)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: strict_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(v) for v in value]
    return value


def write_summary(run_dir: Path, summary: dict) -> None:
    text = json.dumps(strict_json_value(summary), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(Path(run_dir) / "summary.json", lambda f: f.write(text.encode()))


def _save_summary(run_dir: Path, summary: dict) -> None:
    """write_summary, or (disk full, folder gone) one line on the console saying what it would have said."""
    try:
        write_summary(run_dir, summary)
    except OSError as e:
        print(f"error: could not write {Path(run_dir) / 'summary.json'} ({e.strerror or e}); the run's status: "
              f"{summary['status']}" + (f" ({summary['error']})" if summary.get("error") else ""), file=sys.stderr)


class RunLogHandler(logging.FileHandler):
    """run.log, which gives up quietly when it cannot be written (disk full): one line on the console once,
    instead of logging's traceback for every record; the console keeps every line."""

    def handleError(self, record) -> None:
        if getattr(self, "_broken", False):
            return
        self._broken = True
        error = sys.exc_info()[1]
        print(f"warning: cannot write {self.baseFilename} ({getattr(error, 'strerror', None) or error}); the log "
              "goes to the console only from here", file=sys.stderr)

    def emit(self, record) -> None:
        if not getattr(self, "_broken", False):
            super().emit(record)


def with_stage_overrides(cfg):
    """The config with the sweep's overrides for this stage applied (see SweepConfig)."""
    extra = cfg.sweep.stage_overrides.get(cfg.stage.name)
    if not extra:
        return cfg
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(extra)))
    except OmegaConfBaseException as e:  # a typo in a key, a value of the wrong type
        raise UsageError(f"sweep.stage_overrides.{cfg.stage.name}={list(extra)}: {str(e).splitlines()[0]}; "
                         "use the keys of gpt2/config.py with values of their type") from None


def new_summary(cfg, hydra_cfg) -> RunSummary:
    multirun = str(hydra_cfg.mode) == "RunMode.MULTIRUN"
    return {
        "stage": cfg.stage.name, "adds": cfg.stage.adds, "status": "running", "error": None,
        "device": None, "device_type": None, "torch_version": torch.__version__, "cuda_version": torch.version.cuda,
        "model": cfg.model.name, "batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len,
        "world_size": distributed.ranks_from_env().world_size, "steps": 0, "steps_measured": 0,
        "tokens_per_step": None, "grad_accum_steps": None,
        "ms_per_step": None, "ms_per_step_min": None, "ms_per_step_max": None, "tokens_per_sec": None,
        "mfu": None, "mfu_peak_tflops": None, "mfu_peak_source": None, "final_loss": None, "val_loss": None,
        "peak_mem_gib": None, "resumed_from": None, "start_step": 0,
        "job_num": hydra_cfg.job.num if multirun else None,
        "command": command_line(), "overrides": list(hydra_cfg.overrides.task),
        "started_at": now_utc(), "finished_at": None, "exit_code": None,
        # where it ran, so that the report can tell runs that shared a machine's device at the same time
        "host": socket.gethostname(), "gpus": visible_gpus(),
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
    }


def visible_gpus():
    """The GPUs this job was given, as the scheduler names them (SLURM's physical ids; else
    CUDA_VISIBLE_DEVICES), or None when nothing says (all of the host's devices are visible)."""
    for var in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"):
        if os.environ.get(var):
            return os.environ[var]
    return None


def _log_traceback_to_file(message: str) -> None:
    """The full traceback goes to the run's log file only; the console gets one line."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, sys.exc_info())
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def run_job(cfg, train_fn) -> dict:
    global _sweep_interrupted
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    ranks = distributed.ranks_from_env()
    if cfg.train.resume == RESUME_AUTO and finished_run_note(run_dir):
        # rank 0 said so and ended before Hydra wrote here (claim_folder); the other ranks end alike, untouched
        return _summary_in(run_dir)
    summary = new_summary(cfg, hydra_cfg)
    code = 1
    try:
        # the stop signals are caught before summary.json exists: once it says "running", a SIGTERM at any
        # moment ends the job "interrupted", never killed with the summary left "running"
        with sigterm_stops_at_once():
            if ranks.is_main:
                _save_summary(run_dir, summary)  # "running": a process killed hard is never taken for a finished run
            cfg = with_stage_overrides(cfg)
            summary["config"] = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
            if _sweep_interrupted:
                summary.update(status="interrupted", error="not run: an earlier job of this sweep was interrupted")
            else:
                train_fn(cfg, run_dir, summary)
    except UsageError as e:
        summary.update(status="failed", error=str(e))
        code = UsageError.exit_code
        log.error(f"error: {e}")
    except KeyboardInterrupt:
        summary.update(status="interrupted", error="stopped at once (a signal outside the training steps, or a "
                                                   "second Ctrl-C): nothing was saved after the last checkpoint")
        _sweep_interrupted = True
        raise
    except Exception as e:  # out of memory, a kernel missing on this device, a bug: record it, go on
        first_line = (str(e).strip().splitlines() or [""])[0]
        summary.update(status="failed", error=f"{type(e).__name__}: {first_line}")
        log.error(f"{summary['stage']} failed: {summary['error']} (traceback in {run_dir / 'run.log'})")
        _log_traceback_to_file(f"{summary['stage']} failed")
    finally:
        summary["finished_at"] = now_utc()
        summary["exit_code"] = 0 if summary["status"] == "ok" else code
        if ranks.is_main:
            _save_summary(run_dir, summary)
        distributed.destroy_process_group()
    if summary["status"] == "interrupted":
        _sweep_interrupted = True
    if summary["status"] != "ok":
        _failures.append((summary["stage"], summary["status"], code))
        _failed_dirs.add(run_dir.resolve())
    return summary


def count_failures_in(sweep_dir: Path) -> None:
    """Add the failed jobs of a sweep to this process's count, from their summary.json files: under a launcher
    plugin (submitit) the jobs ran in other processes, so only their files say how they ended. A job folder
    without a summary, or one still "running", was killed: a failure too. Jobs of this process count once."""
    try:
        job_dirs = sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and re.match(r"^\d+_", p.name))
    except OSError as e:  # the sweep folder cannot be read: the sweep cannot be called a success
        log.error(f"could not read the jobs' summaries back from {sweep_dir}: {e}")
        _failures.append(("sweep", "incomplete", 1))
        return
    for job_dir in job_dirs:
        if job_dir.resolve() in _failed_dirs:
            continue
        try:
            summary = json.loads((job_dir / "summary.json").read_text())
            stage, status, code = summary.get("stage"), summary.get("status"), summary.get("exit_code")
        except (OSError, ValueError, AttributeError):
            stage, status, code = job_dir.name, "incomplete", 1
        if status == "ok":
            continue
        _failures.append((stage, status if status != "running" else "incomplete", code if code in (1, 2) else 1))
        _failed_dirs.add(job_dir.resolve())


def exit_code() -> int:
    """0 when every job of this process ended ok; 2 for bad input alone; else 1."""
    if not _failures:
        return 0
    return 2 if all(code == 2 for _, _, code in _failures) else 1
