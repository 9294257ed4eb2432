"""Hydra hooks: never write into a folder that holds an earlier run; a report when a sweep ends."""

import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from . import distributed
from .job import earlier_run_in

log = logging.getLogger("gpt2.sweep")


def _refuse_used_folder(folder: str, key: str) -> None:
    # runs before Hydra writes .hydra/ or the log file into the folder, so nothing is overwritten; under
    # torchrun only rank 0 looks (the others would find its fresh summary); if it refuses, torchrun stops them
    if not distributed.ranks_from_env().is_main:
        return
    status = earlier_run_in(Path(folder))
    if status is not None:
        print(f"error: {folder} already holds a run (status: {status}); nothing was overwritten. "
              f"Choose another {key}=..., or continue that run with train.resume={folder}", file=sys.stderr)
        sys.exit(2)


class SpeedrunCallbacks(Callback):
    def on_run_start(self, config, **kwargs) -> None:
        _refuse_used_folder(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        _refuse_used_folder(config.hydra.sweep.dir, "hydra.sweep.dir")

    def on_multirun_end(self, config, **kwargs) -> None:
        if not distributed.ranks_from_env().is_main:
            return
        from .report import build_report  # pandas and matplotlib load only when a sweep ends

        try:
            paths = build_report([Path(config.hydra.sweep.dir)])
            log.info(f"report: {paths['md']}")
        except Exception as e:  # the runs are already on disk; `python -m gpt2.report DIR` can retry
            log.error(f"could not write the report: {type(e).__name__}: {e}")
