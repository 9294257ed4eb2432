"""One folder, one run: whether a run folder already holds a run, and the claim a run makes on its folder
before Hydra writes into it (with train.resume=auto, the run it continues there)."""

import atexit
import contextlib
import fcntl
import json
import os
import re
import socket
from pathlib import Path

from omegaconf import OmegaConf

from gpt2.training.checkpoint import RESUME_AUTO
from gpt2.errors import UsageError

RUN_FILES = ("summary.json", "checkpoint.pt", "metrics.jsonl")  # any of them: the folder holds a run
LOCK_NAME = ".gpt2-speedrun.lock"


def _summary_in(job_dir: Path):
    """summary.json of `job_dir` as a dict; None when there is none, "unreadable" when it cannot be read."""
    try:
        summary = json.loads((Path(job_dir) / "summary.json").read_text())
        return summary if isinstance(summary, dict) else "unreadable"
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "unreadable"


def _run_status(job_dir: Path):
    """The status of a run that wrote into `job_dir` itself (not its sub-folders), else None."""
    summary = _summary_in(job_dir)
    if summary == "unreadable":
        return "unreadable summary.json"
    if summary is not None:
        return summary.get("status") or "unknown"
    found = [name for name in RUN_FILES[1:] if (job_dir / name).exists()]
    return f"unknown: {', '.join(found)} but no summary.json" if found else None


def earlier_run_in(folder: Path):
    """The status of a run that already wrote into `folder` (or its job sub-folders), else None."""
    for job_dir in [Path(folder), *sorted(p for p in Path(folder).glob("*") if p.is_dir())]:
        status = _run_status(job_dir)
        if status is not None:
            return status
    return None


def finished_run_note(folder: Path):
    """When `folder` holds a run that ended ok: the line saying that train.resume=auto has nothing to do."""
    summary = _summary_in(folder)
    if not isinstance(summary, dict) or summary.get("status") != "ok":
        return None
    return (f"{folder} holds a finished run (status: ok, {summary.get('steps')} steps); nothing to do: "
            f"train.resume=auto continues only an unfinished run. To train it further, continue it in another "
            f"folder: hydra.run.dir=NEW train.resume={folder}")


def check_continuable(folder: Path, key: str, hydra_cfg) -> None:
    """train.resume=auto: `folder` is fixed, and new or holding one run that can go on; else say why not.

    A finished run ends this process at once, exit 0 and nothing written, so that a requeued job that had
    already finished does no work twice; a diverged run would only diverge again from the same checkpoint.
    """
    if key != "hydra.run.dir":
        raise UsageError(f"train.resume=auto continues one run in its own folder, not a sweep ({key}); continue "
                         "a job on its own: python run.py <its overrides> hydra.run.dir=ITS_FOLDER train.resume=auto")
    check_fixed_folder(hydra_cfg)
    own = _run_status(folder)
    if own is None and earlier_run_in(folder) is not None:  # a sweep's folder, or one that holds other runs
        raise UsageError(f"{folder} holds runs in its sub-folders, not one run of its own; nothing was "
                         f"overwritten. Choose another {key}=...")
    note = finished_run_note(folder)
    if note:
        print(note, flush=True)
        raise SystemExit(0)
    if own == "diverged":
        raise UsageError(f"{folder} holds a run that diverged: train.resume=auto would only diverge again from "
                         "its checkpoint, so nothing was written. Lower optim.lr or set optim.grad_clip, and start "
                         "again in another folder (hydra.run.dir=...)")


def check_fixed_folder(hydra_cfg) -> None:
    """train.resume=auto finds the run by its folder: a folder named by the clock is new on every restart
    (torchrun's restarts included), so each restart would silently start over."""
    folder = str(OmegaConf.to_container(hydra_cfg.run, resolve=False).get("dir"))
    if re.search(r"\$\{(shared_)?now:", folder):
        raise UsageError(f"train.resume=auto needs a fixed run folder, but hydra.run.dir={folder} is named by the "
                         "clock, so a restart would not find this run and would start over; add hydra.run.dir=DIR, "
                         "the same on every restart")


_claimed = {}  # folder -> open lock file: the lock lives as long as this process, and dies with it


def claim_folder(folder: Path, key: str, config=None) -> None:
    """One folder, one run: refuse a folder that holds an earlier run or that another process is using.

    An exclusive flock on a lock file inside the folder decides between two runs started at once; the OS
    drops it when its process ends, however it ends, so a killed run never leaves a stale claim. The check
    for earlier run files is made before anything is created (a refused folder is left as it was) and again
    once the lock is held (the other run may have written in between). With the run's config saying
    train.resume=auto the earlier run may be the folder's own, which this one continues (check_continuable).
    """
    folder = Path(folder)
    if folder in _claimed:
        return
    continuing = config is not None and OmegaConf.select(config, "train.resume") == RESUME_AUTO

    def refusal():  # the earlier run that keeps this one out of the folder, if any
        if continuing:
            check_continuable(folder, key, config.hydra)
            return None
        return earlier_run_in(folder)

    status = refusal()
    if status is None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = (folder / LOCK_NAME).open("a+")
        except OSError as e:
            raise UsageError(f"{key}={folder}: cannot write there ({e.strerror}); choose a folder you can write "
                             f"to with {key}=...") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            owner = lock.read().strip() or "unknown"
            lock.close()
            raise UsageError(f"{folder} is in use by another run (process {owner}); nothing was written. Choose "
                             f"another {key}=..., or wait for that run to end") from None
        try:
            status = refusal()
        except BaseException:  # refused (or finished) after all: the lock goes with the refusal
            lock.close()
            raise
        if status is None:
            lock.truncate(0)
            lock.write(f"{os.getpid()} on {socket.gethostname()}\n")
            lock.flush()
            _claimed[folder] = lock
            atexit.register(_release, folder)
            return
        lock.close()
    resumable = (folder / "checkpoint.pt").is_file()  # (never advise resuming from a folder without one)
    raise UsageError(f"{folder} already holds a run (status: {status}); nothing was overwritten. Choose another "
                     f"{key}=..." + (f", or continue that run with train.resume={folder}" if resumable else ""))


def _release(folder: Path) -> None:
    lock = _claimed.pop(folder, None)
    if lock is not None:
        with contextlib.suppress(OSError):
            (folder / LOCK_NAME).unlink()
        lock.close()
