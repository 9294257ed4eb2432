"""Data-parallel set-up under torchrun: ranks from the environment, the process group, one run folder.

torchrun starts every rank with RANK / LOCAL_RANK / WORLD_SIZE set; a plain `python run.py` has none and
is a world of one. All ranks run Hydra, so all of them must agree on the run folder (see `shared_now`)
and only rank 0 may write into it.

torch is imported inside the functions that use it: run.py imports this module to read the ranks, and
`python run.py --help` or a TAB completion should not wait a second or two for torch to load.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from gpt2.errors import UsageError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("gpt2.distributed")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_env() -> Ranks:
    return Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                 int(os.environ.get("WORLD_SIZE", 1)))


_shared_start = None


def shared_now(fmt: str) -> str:
    """Like Hydra's ${now:fmt}, but every rank of one torchrun launch gets rank 0's start time.

    Each rank would otherwise read its own clock and, a second apart, make its own run folder. torchrun's
    agent runs a key-value store that all ranks can reach: rank 0 publishes its time there once.
    """
    global _shared_start
    ranks = ranks_from_env()
    if ranks.world_size == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return datetime.datetime.now().strftime(fmt)
    if _shared_start is None:
        import torch.distributed as dist

        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=300))
        key = f"gpt2_speedrun/start/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        if ranks.is_main:
            store.set(key, datetime.datetime.now().isoformat())
        _shared_start = datetime.datetime.fromisoformat(store.get(key).decode())
    return _shared_start.strftime(fmt)


def _torchrun_process() -> Optional[tuple]:
    """(argv, environment) of the torchrun process that started this rank, as the user started it (Linux's
    /proc keeps a process's initial environment, before torchrun adds OMP_NUM_THREADS to it); None when no
    torchrun started this rank or /proc cannot tell (another OS)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # set by torchrun's agent, the parent of every rank
        return None
    proc = Path("/proc") / str(os.getppid())
    try:
        argv = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0")[:-1]]
        environ = (proc / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return argv, {e.decode(errors="replace").partition("=")[0] for e in environ if e}


def torchrun_command() -> Optional[list]:
    """The torchrun command that started this rank, as typed (`torchrun --standalone --nproc_per_node=2
    run.py ...`; `python -m torch.distributed.run` is the same program, written `torchrun`), or None."""
    launched = _torchrun_process()
    argv = launched[0] if launched else []
    for i, arg in enumerate(argv):
        if Path(arg).name == "torchrun":
            return ["torchrun", *argv[i + 1:]]
        if arg == "-m" and argv[i + 1:i + 2] == ["torch.distributed.run"]:
            return ["torchrun", *argv[i + 2:]]
    return None


def cpu_threads_per_rank() -> Optional[int]:
    """Threads for each rank of a torchrun launch on CPUs, when the user did not set OMP_NUM_THREADS: torchrun
    then sets it to 1 for every rank (and warns), leaving all but N cores idle on a big machine; this machine's
    cores shared among its ranks use them all without overloading it. None: keep what is set."""
    launched = _torchrun_process()
    if launched is None or "OMP_NUM_THREADS" in launched[1]:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def hydra_overrides_for_rank(ranks: Ranks) -> list:
    """Extra Hydra overrides for ranks other than 0: no .hydra/ files, no log file, warnings only."""
    if ranks.is_main:
        return []
    return ["hydra.output_subdir=null", "hydra.job_logging.root.handlers=[console]",
            "hydra.job_logging.root.level=WARNING", "hydra.hydra_logging.root.level=WARNING"]


def backend_for(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise UsageError(f"train.ddp_backend=nccl needs CUDA, but this run is on {device.type}: "
                         "use train.ddp_backend=gloo (or auto), or run on a GPU")
    return requested


def init_process_group(ranks: Ranks, requested_backend: str, device: torch.device) -> None:
    import torch
    import torch.distributed as dist

    threads = cpu_threads_per_rank() if device.type == "cpu" and ranks.world_size > 1 else None
    if threads and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        if ranks.is_main:
            log.info(f"{threads} CPU threads per rank (this machine's cores shared among its ranks; torchrun's "
                     "OMP_NUM_THREADS=1 is for when you set none: set OMP_NUM_THREADS yourself to choose)")
    if ranks.world_size == 1 or dist.is_initialized():
        return
    backend = backend_for(requested_backend, device)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, rank=ranks.rank, world_size=ranks.world_size,
                            timeout=datetime.timedelta(minutes=10), **kwargs)


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, in place (a no-op in a world of one)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM)
        if dist.get_backend() != "nccl":  # gloo has no AVG
            t /= dist.get_world_size()
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one: ranks must stop at the same step."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
