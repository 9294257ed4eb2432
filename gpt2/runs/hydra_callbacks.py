"""Hydra hooks: one run per folder (claimed before anything is written); a report when a sweep ends."""

import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from gpt2 import distributed
from gpt2.errors import UsageError, print_error
from gpt2.runs import job
from gpt2.runs.folders import claim_folder

log = logging.getLogger("gpt2.sweep")


def _claim(folder: str, key: str, config) -> None:
    # runs before Hydra writes .hydra/ or the log file into the folder, so nothing is overwritten; under
    # torchrun only rank 0 claims (the others would find its claim); if it refuses, torchrun stops them
    if not distributed.ranks_from_env().is_main:
        return
    try:
        claim_folder(Path(folder), key, config)
    except UsageError as e:
        sys.exit(print_error(e))


def _check(config) -> None:
    # a single run's settings are known before Hydra makes its folder: refuse bad ones now, so that the
    # folder is never made (a sweep's jobs are checked in the job: their settings are known only there).
    # Every rank exits; only rank 0 prints, unless the problem is this rank's own (its GPU): rank 0 passes then
    from gpt2.training.checks import check_before_start

    ranks = distributed.ranks_from_env()
    try:
        check_before_start(job.with_stage_overrides(config), ranks)
    except UsageError as e:
        if ranks.is_main or str(e).startswith(f"local rank {ranks.local_rank} "):
            print_error(e)
        sys.exit(e.exit_code)


class SpeedrunCallbacks(Callback):
    def on_run_start(self, config, **kwargs) -> None:
        _check(config)
        _claim(config.hydra.run.dir, "hydra.run.dir", config)

    def on_multirun_start(self, config, **kwargs) -> None:
        _claim(config.hydra.sweep.dir, "hydra.sweep.dir", config)

    def on_multirun_end(self, config, **kwargs) -> None:
        if not distributed.ranks_from_env().is_main:
            return
        from gpt2.reporting.build import build_report  # pandas and matplotlib load only when a sweep ends

        # this runs in the submitting process once every job has returned (Hydra's basic launcher ran them
        # here; a launcher plugin such as submitit waits for its jobs before it returns): the jobs' own
        # summary.json files say which failed, so that run.py exits non-zero under any launcher
        job.count_failures_in(Path(config.hydra.sweep.dir))
        try:
            paths = build_report([Path(config.hydra.sweep.dir)])
            log.info(f"report: {paths['md']}")
        except Exception as e:  # the runs are already on disk; `python -m gpt2.report DIR` can retry
            log.error(f"could not write the report: {type(e).__name__}: {e}")
