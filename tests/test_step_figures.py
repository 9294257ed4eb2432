"""What one step applies and what the run reports about it, end to end through the real loop: gradient
clipping changes the update but not the logged norm, and ms/step is the median of the steady-state steps."""

import statistics
import types

import pytest
import torch

import gpt2.training.loop as train_module
from gpt2.model.gpt import GPT, GPTConfig
from helpers import records, run_train, saved_weights


def start_weights():
    """The weights the runs start from (their seed), by parameter: the head tied to wte counted once."""
    torch.manual_seed(1337)
    model = GPT(GPTConfig.from_preset("tiny"))
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_clipping_scales_the_update_and_the_log_keeps_the_norm_before_clipping(tmp_path, shakespeare_path):
    # plain SGD, lr=1, no momentum or decay: a step moves the weights by minus the (clipped) gradient, so the
    # same first batch with and without clipping must give updates in the ratio clip / norm
    common = ["optim.name=sgd", "optim.lr=1.0", "optim.momentum=0", "optim.weight_decay=0", "train.steps=1",
              "train.batch_size=2", "train.seq_len=32", "train.checkpoint_every=1"]
    clip = 0.05
    _, free_dir = run_train(tmp_path, shakespeare_path, *common, name="unclipped")
    _, clipped_dir = run_train(tmp_path, shakespeare_path, *common, f"optim.grad_clip={clip}", name="clipped")
    start = start_weights()
    free_weights, clipped_weights = saved_weights(free_dir), saved_weights(clipped_dir)
    free = {k: free_weights[k] - w for k, w in start.items()}  # = -grad
    clipped = {k: clipped_weights[k] - w for k, w in start.items()}
    keys = list(start)
    grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(free[k]) for k in keys])).item()
    assert grad_norm > 10 * clip  # the case under test: a gradient well over the limit

    [free_row], [clipped_row] = records(free_dir), records(clipped_dir)
    # what the log and the step's record report is the norm before clipping, in both runs
    assert free_row["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    assert clipped_row["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    # what the optimizer applied is the clipped gradient: the same direction, scaled to norm `clip`
    scale = clip / grad_norm
    for k in keys:
        torch.testing.assert_close(clipped[k], free[k] * scale, rtol=1e-3, atol=1e-7, msg=k)
    applied = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(clipped[k]) for k in keys])).item()
    assert applied == pytest.approx(clip, rel=1e-3)


class StepClock:
    """A perf_counter for the loop whose steps take the given milliseconds: train_step reads it once at the
    start of a step and once at its end."""

    def __init__(self, step_ms):
        self.readings = []
        now = 100.0
        for ms in step_ms:
            self.readings += [now, now + ms / 1000]
            now += ms / 1000 + 1.0
        self.readings.reverse()

    def perf_counter(self):
        return self.readings.pop()


def test_ms_per_step_is_the_median_of_the_steady_state_steps(tmp_path, shakespeare_path, monkeypatch):
    # two warm-up steps (train.timing_skip=2), then steady steps with one outlier: median 11.5, mean 33.25
    step_ms = [700.0, 400.0, 10.0, 12.0, 11.0, 100.0]
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=StepClock(step_ms).perf_counter))
    s, run_dir = run_train(tmp_path, shakespeare_path, "train.steps=6", "train.batch_size=2", "train.seq_len=32",
                           "train.timing_skip=2")
    logged = [r["ms"] for r in records(run_dir)]
    assert logged == pytest.approx(step_ms)  # the loop timed its steps with this clock
    steady = logged[2:]
    assert s["steps_measured"] == 4
    assert s["ms_per_step"] == pytest.approx(statistics.median(steady)) == pytest.approx(11.5)
    assert s["ms_per_step"] != pytest.approx(statistics.mean(steady))
    assert (s["ms_per_step_min"], s["ms_per_step_max"]) == (pytest.approx(10.0), pytest.approx(100.0))
    assert s["tokens_per_sec"] == pytest.approx(s["tokens_per_step"] / (11.5 / 1000))
