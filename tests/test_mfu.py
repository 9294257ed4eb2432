"""MFU against a peak measured as the model runs its matmuls: the stage's dtype, the model's shapes, the best
of several calls, measured again at the end; a figure above 100 % is flagged, never printed as a fact."""

import logging
import re
import types

import pytest
import torch

from gpt2.training import metrics
from gpt2.model.gpt import GPT, GPTConfig
from helpers import run_train

CPU = torch.device("cpu")
TINY_SHAPES = metrics.model_matmul_shapes(2 * 32, 64, 50257, CPU)  # B=2, T=32 on the tiny model


@pytest.fixture
def fresh_peaks(monkeypatch):
    """No best peak left over from earlier tests in this process."""
    monkeypatch.setattr(metrics, "_best_measured", {})


@pytest.mark.parametrize("dtype, autocast", [("bf16", True), ("fp32", False)])
def test_the_peak_runs_the_models_linear_in_the_stages_dtype(monkeypatch, dtype, autocast):
    seen = []
    real_linear = torch.nn.functional.linear

    def spy(x, weight, *args):
        seen.append((tuple(x.shape), tuple(weight.shape), x.dtype, weight.dtype, torch.is_autocast_enabled("cpu"),
                     torch.get_autocast_dtype("cpu")))
        return real_linear(x, weight, *args)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    shapes = ((8, 16, 64), (8, 16, 300))
    assert metrics.measure_linear_tflops(CPU, dtype, shapes, reps=2) > 0
    assert len(seen) == 2 * 3  # every shape: one untimed call, then the timed ones
    assert {(x, w) for x, w, *_ in seen} == {((8, 16), (64, 16)), ((8, 16), (300, 16))}
    # fp32 tensors as the model holds them; autocast (bf16) on exactly when the stage's matmuls run in bf16
    assert all(x == w == torch.float32 and enabled is autocast for _, _, x, w, enabled, _ in seen)
    if autocast:
        assert all(cast == torch.bfloat16 for *_, cast in seen)


def test_the_shapes_are_the_models_mlp_and_classifier_cut_to_a_short_measurement():
    mlp, classifier = TINY_SHAPES
    assert mlp == (64, 64, 256)  # (B*T, n_embd) x (n_embd, 4 n_embd), whole
    assert classifier[:2] == (64, 64) and 256 < classifier[2] <= 50257  # the classifier, fewer columns
    gpt2_on_cpu = metrics.model_matmul_shapes(16 * 1024, 768, 50304, CPU)
    assert gpt2_on_cpu == ((metrics.MIN_ROWS, 768, 3072),)  # one shape: both cut to the same one
    for m, k, n in TINY_SHAPES:
        assert 6 * m * k * n <= metrics.CALL_FLOPS["cpu"]


class CallClock:
    """perf_counter for metrics: the timed calls of a measurement take the given seconds (read twice a call)."""

    def __init__(self, seconds):
        self.readings = []
        for s in seconds:
            self.readings += [0.0, s]
        self.readings.reverse()

    def perf_counter(self):
        return self.readings.pop()


def test_the_peak_is_the_best_of_the_timed_calls_not_the_first_call(monkeypatch):
    # the untimed first call is the fastest here, then 3 s, 1 s, 2 s: the peak is the 1 s call's rate
    clock = CallClock([0.1, 3.0, 1.0, 2.0])
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    m, k, n = 8, 16, 64
    assert metrics.measure_linear_tflops(CPU, "fp32", [(m, k, n)], reps=3) == pytest.approx(6 * m * k * n / 1.0 / 1e12)


def test_a_measured_peak_keeps_the_best_of_its_measurements(monkeypatch, fresh_peaks):
    rates = iter([2.0, 3.0, 1.0])  # start of a run, its end, the next job: a busy machine only lowers a rate
    monkeypatch.setattr(metrics, "measure_linear_tflops", lambda device, dtype, shapes: next(rates))
    assert [metrics.peak_tflops(CPU, "bf16", TINY_SHAPES) for _ in range(3)] == [(2.0, "measured"), (3.0, "measured"),
                                                                                (3.0, "measured")]


def test_known_gpus_keep_their_datasheet_peak(monkeypatch, fresh_peaks):
    def no_measuring(*args, **kwargs):
        raise AssertionError("a GPU with a datasheet row is never measured")

    monkeypatch.setattr(metrics, "measure_linear_tflops", no_measuring)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    assert metrics.peak_tflops(cuda, "bf16", TINY_SHAPES) == (989.4, "datasheet")
    assert metrics.peak_tflops(cuda, "tf32") == (494.7, "datasheet")


@pytest.mark.parametrize("stage, dtype", [("bf16", "bf16"), ("baseline", "fp32")])
def test_a_run_measures_its_peak_in_its_dtype_on_its_shapes_at_start_and_end(tmp_path, shakespeare_path, monkeypatch,
                                                                             fresh_peaks, stage, dtype):
    calls, rates = [], iter([0.05, 0.08])  # the end's measurement is the better one: the run keeps it
    monkeypatch.setattr(metrics, "measure_linear_tflops",
                        lambda device, dtype, shapes: calls.append((device.type, dtype, shapes)) or next(rates))
    s, _ = run_train(tmp_path, shakespeare_path, f"+stage={stage}", "train.steps=2", "train.batch_size=2",
                     "train.seq_len=32")
    assert calls == [("cpu", dtype, TINY_SHAPES)] * 2
    assert s["compute_dtype"] == dtype and s["mfu_peak_source"] == "measured"
    assert s["mfu_peak_tflops"] == 0.08
    flops_per_token = GPT(GPTConfig.from_preset("tiny")).flops_per_token(32)
    assert s["mfu"] == pytest.approx(flops_per_token * s["tokens_per_sec"] / 0.08e12, rel=1e-3)


def console_mfu_figures(records):
    return [float(x) for r in records for x in re.findall(r"mfu (\d+(?:\.\d+)?)%", r.getMessage())]


def test_mfu_above_100_percent_is_flagged_and_never_printed_as_a_figure(tmp_path, shakespeare_path, monkeypatch,
                                                                         fresh_peaks, caplog):
    caplog.set_level(logging.INFO, logger="gpt2")
    monkeypatch.setattr(metrics, "measure_linear_tflops", lambda device, dtype, shapes: 1e-9)  # 1 kFLOP/s
    s, _ = run_train(tmp_path, shakespeare_path, "+stage=bf16", "train.steps=2", "train.batch_size=2",
                     "train.seq_len=32")
    assert s["status"] == "ok" and s["mfu"] > 1
    assert s["mfu_note"] == ("above 100 % of the measured peak: the peak was measured on a busy machine; "
                             "not a reliable figure")
    said = [r.getMessage() for r in caplog.records]
    assert console_mfu_figures(caplog.records) == []  # no "mfu 1234.5%": neither on the step lines nor at the end
    assert sum("| mfu n/a (above 100% of the peak)" in line for line in said) == 2  # both step lines
    assert any(line.startswith("bf16:") and "mfu n/a" in line for line in said)  # the closing line
    assert any(line.startswith("mfu: above 100 % of the measured peak") for line in said)


def test_a_plausible_mfu_has_no_note_and_is_printed(tmp_path, shakespeare_path, monkeypatch, fresh_peaks, caplog):
    caplog.set_level(logging.INFO, logger="gpt2")
    monkeypatch.setattr(metrics, "measure_linear_tflops", lambda device, dtype, shapes: 1e3)  # 1 PFLOP/s
    s, _ = run_train(tmp_path, shakespeare_path, "train.steps=2", "train.batch_size=2", "train.seq_len=32")
    assert 0 < s["mfu"] < 1 and s["mfu_note"] is None
    figures = console_mfu_figures(caplog.records)
    assert len(figures) == 3 and all(0 <= f <= 100 for f in figures)  # two step lines and the closing line


def test_mfu_note_and_console_text():
    assert metrics.mfu_note(0.42, "measured") is None and metrics.mfu_note(None, "measured") is None
    assert metrics.mfu_note(1.3, "datasheet").startswith("above 100 % of the datasheet peak")
    assert metrics.mfu_text(0.4213) == "42.13%" and metrics.mfu_text(0.4213, 1) == "42.1%"
    assert metrics.mfu_text(1.0) == "100.00%" and metrics.mfu_text(1.24) == "n/a (above 100% of the peak)"
