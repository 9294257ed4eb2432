"""Torch's global state between the jobs of a sweep: what one job leaves behind is freed by the next."""

import gc
import weakref

import torch

from gpt2.training.devices import configure_torch
from helpers import compose_with


class Cycle:
    """An object only the cycle collector can free: a model and its optimizer can hold such cycles."""

    def __init__(self):
        self.me = self
        self.weights = torch.zeros(1000)


def test_each_job_frees_what_the_last_left_in_cycles_and_freezes_the_rest():
    cfg = compose_with(["model=tiny", "train.device=cpu"])
    cpu = torch.device("cpu")
    gc.disable()  # no automatic collection in between: only configure_torch's own
    try:
        configure_torch(cfg.train, cpu)  # the previous job
        left_behind = Cycle()
        weights = weakref.ref(left_behind.weights)
        del left_behind
        assert weights() is not None  # garbage, but in a cycle
        configure_torch(cfg.train, cpu)  # the next job
        freed = weights() is None
        assert freed, "the last job's garbage in a cycle outlived the next job's set-up"
        # what survives the collection belongs to the process (modules, Hydra's objects): frozen, so that
        # the next job's collection does not scan it again (0.3-0.4 s a job with torch._dynamo imported)
        assert gc.get_freeze_count() > 0
    finally:
        gc.enable()
