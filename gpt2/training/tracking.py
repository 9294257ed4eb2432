"""Weights & Biases, optional and harmless: a logging failure warns once and never ends a run."""

import logging
from typing import Optional

from gpt2.config import WandbConfig, option_str

log = logging.getLogger("gpt2.training.tracking")


class WandbRun:
    """One wandb run per training run; a resumed run continues the wandb run it resumes (`resume_id`)."""

    def __init__(self, w: WandbConfig, stage: str, config: dict, run_dir, resume_id: Optional[str] = None):
        """`w`: the run's logger.wandb section; `stage`: the run's name unless logger.wandb.name gives one;
        `config`: the run's whole config as plain values, recorded with the wandb run."""
        self.run = None
        mode = option_str(w.mode)
        if mode == "disabled":
            return
        try:
            import wandb

            resume = {"id": resume_id, "resume": "allow"} if resume_id else {}
            self.run = wandb.init(mode=mode, project=w.project, entity=w.entity, name=w.name or stage,
                                  dir=str(run_dir), config=config, **resume)
        except Exception as e:  # no network, no login, a broken install: the run matters more
            self._disable("start", e)

    @property
    def id(self) -> Optional[str]:
        return getattr(self.run, "id", None) if self.run is not None else None

    def _disable(self, what: str, error: Exception) -> None:
        log.warning(f"wandb: could not {what} ({type(error).__name__}: {error}); continuing without it")
        self.run = None

    def log(self, record: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        except Exception as e:
            self._disable("log", e)

    def finish(self, summary: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self.run.finish()
        except Exception as e:
            self._disable("finish", e)
