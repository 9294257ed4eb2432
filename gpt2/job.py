"""One Hydra job: the run folder, summary.json, and what happens when a job goes wrong.

A multirun runs every job in this one process, and Hydra skips its end-of-sweep hook (our report) when
a job raises. So a job never raises: it records its failure in summary.json, the sweep goes on, and the
process exits non-zero at the end (`exit_code`).
"""

import contextlib
import datetime
import json
import logging
import shlex
import signal
import sys
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import distributed
from .checkpoint import atomic_write_bytes
from .config import register_configs
from .errors import UsageError

log = logging.getLogger("gpt2.job")

_failures = []  # (stage, status, exit code) of this process's jobs that did not end ok
_sweep_interrupted = False  # after a Ctrl-C the rest of a sweep is skipped, but the report is still written

register_configs()
OmegaConf.register_new_resolver("shared_now", distributed.shared_now, use_cache=True, replace=True)


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line() -> str:
    ranks = distributed.ranks_from_env()
    launcher = ["python"] if ranks.world_size == 1 else ["torchrun", f"--nproc_per_node={ranks.world_size}"]
    argv = [a for a in sys.argv if a not in distributed.hydra_overrides_for_rank(ranks)]
    return shlex.join(launcher + argv)


def write_summary(run_dir: Path, summary: dict) -> None:
    atomic_write_bytes(Path(run_dir) / "summary.json",
                       lambda f: f.write((json.dumps(summary, indent=2) + "\n").encode()))


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


def new_summary(cfg, hydra_cfg) -> dict:
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
        "started_at": now_utc(), "finished_at": None,
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
    }


def _log_traceback_to_file(message: str) -> None:
    """The full traceback goes to the run's log file only; the console gets one line."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, sys.exc_info())
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _stop_at_once(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_stops_at_once():
    """SIGTERM outside the training steps (set-up, final validation) stops like a Ctrl-C there: at once, but
    with summary.json saying "interrupted". Inside the steps train.StopFlag finishes the step and saves."""
    previous = None
    with contextlib.suppress(ValueError):  # signal handlers can only be set from the main thread
        previous = signal.signal(signal.SIGTERM, _stop_at_once)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run_job(cfg, train_fn) -> dict:
    global _sweep_interrupted
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    ranks = distributed.ranks_from_env()
    summary = new_summary(cfg, hydra_cfg)
    if ranks.is_main:
        write_summary(run_dir, summary)  # "running": a process killed hard is never mistaken for a finished run
    code = 1
    try:
        cfg = with_stage_overrides(cfg)
        summary["config"] = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        if _sweep_interrupted:
            summary.update(status="interrupted", error="not run: an earlier job of this sweep was interrupted")
        else:
            with sigterm_stops_at_once():
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
        if ranks.is_main:
            write_summary(run_dir, summary)
        distributed.destroy_process_group()
    if summary["status"] == "interrupted":
        _sweep_interrupted = True
    if summary["status"] != "ok":
        _failures.append((summary["stage"], summary["status"], code))
    return summary


def exit_code() -> int:
    """0 when every job of this process ended ok; 2 for bad input alone; else 1."""
    if not _failures:
        return 0
    return 2 if all(code == 2 for _, _, code in _failures) else 1


def earlier_run_in(folder: Path):
    """The status of a run that already wrote into `folder` (or its job sub-folders), else None."""
    for path in [Path(folder) / "summary.json", *Path(folder).glob("*/summary.json")]:
        if not path.is_file():
            continue
        try:
            return json.loads(path.read_text()).get("status") or "unknown"
        except (OSError, ValueError):
            return "unreadable"
    return None
