"""The training loop in-process on a tiny model: gradient accumulation, schedule, weight decay, summaries."""

import json
import logging
import math

import pytest
import torch

from gpt2.model.gpt import GPT, GPTConfig
from gpt2.training.optim import build_optimizer, lr_at
from helpers import compose_with, run_train, saved_weights


@pytest.mark.slow
def test_grad_accumulation_equals_one_big_batch(tmp_path, shakespeare_path):
    # plain SGD with lr=1 and no decay: the weights after one step are the start minus the gradient,
    # so equal weights mean equal gradients
    common = ["optim.name=sgd", "optim.lr=1.0", "optim.weight_decay=0", "train.steps=1", "train.seq_len=32",
              "train.checkpoint_every=1"]
    big, big_dir = run_train(tmp_path, shakespeare_path, *common, "train.batch_size=8", name="big")
    acc, acc_dir = run_train(tmp_path, shakespeare_path, *common, "train.batch_size=2",
                             "train.total_batch_size=256", name="accumulated")
    assert acc["grad_accum_steps"] == 4 and big["grad_accum_steps"] == 1
    assert acc["tokens_per_step"] == big["tokens_per_step"] == 256
    assert acc["final_loss"] == pytest.approx(big["final_loss"], rel=1e-6)
    w_big, w_acc = saved_weights(big_dir), saved_weights(acc_dir)
    torch.manual_seed(1337)  # the runs' seed: the weights they started from
    start = GPT(GPTConfig.from_preset("tiny")).state_dict()
    for key in w_big:
        torch.testing.assert_close(w_acc[key], w_big[key], rtol=0, atol=2e-6, msg=key)
        step = (w_big[key] - start[key]).abs().max().item()
        assert step > 1e-4, f"{key} did not move: the comparison would be empty"


def test_total_batch_must_divide(tmp_path, shakespeare_path):
    from gpt2.errors import UsageError

    with pytest.raises(UsageError, match="train.total_batch_size=1000 is not divisible by B\\*T\\*world"):
        run_train(tmp_path, shakespeare_path, "train.batch_size=2", "train.seq_len=32",
                  "train.total_batch_size=1000")


def test_cosine_schedule():
    cfg = compose_with(["+stage=gpt3-optim"]).optim  # lr 6e-4, warm-up 10, floor 10%
    total = 50
    assert lr_at(0, cfg, total) == pytest.approx(6e-4 / 10)  # warm-up starts above zero
    assert lr_at(4, cfg, total) == pytest.approx(6e-4 * 5 / 10)
    assert lr_at(9, cfg, total) == pytest.approx(6e-4)  # last warm-up step reaches the peak
    assert lr_at(10, cfg, total) == pytest.approx(6e-4)  # decay starts at the peak
    assert lr_at(30, cfg, total) == pytest.approx(6e-5 + 0.5 * (6e-4 - 6e-5))  # half way: the mid-point
    assert lr_at(total, cfg, total) == pytest.approx(6e-5)  # the floor
    assert lr_at(total + 100, cfg, total) == pytest.approx(6e-5)
    decay = [lr_at(s, cfg, total) for s in range(10, total)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    constant = compose_with([]).optim
    assert {lr_at(s, constant, total) for s in (0, 10, 49)} == {3e-4}


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig.from_preset("tiny"))
    gpt3 = build_optimizer(model, compose_with(["+stage=gpt3-optim"]).optim, torch.device("cpu"))
    decayed, plain = gpt3.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decayed["params"]} >= {"transformer.wte.weight", "transformer.wpe.weight",
                                                          "transformer.h.0.attn.c_attn.weight"}
    assert "transformer.ln_f.weight" in {names[id(p)] for p in plain["params"]}
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    assert tuple(decayed["betas"]) == (0.9, 0.95)
    baseline = build_optimizer(model, compose_with([]).optim, torch.device("cpu"))
    assert len(baseline.param_groups) == 1 and baseline.param_groups[0]["weight_decay"] == 0.01


def test_summary_figures_are_consistent(tmp_path, shakespeare_path):
    s, run_dir = run_train(tmp_path, shakespeare_path, "+stage=tf32", "train.steps=4", "train.batch_size=2",
                           "train.timing_skip=2", "train.sdpa_backend=cudnn")
    assert s["status"] == "ok" and s["steps"] == 4 and s["steps_measured"] == 2
    assert s["ms_per_step_min"] <= s["ms_per_step"] <= s["ms_per_step_max"]
    assert s["tokens_per_sec"] == pytest.approx(s["tokens_per_step"] / (s["ms_per_step"] / 1000))
    assert 0 < s["mfu"] < 1 and s["mfu_peak_source"] == "measured"
    assert math.isfinite(s["final_loss"]) and math.isfinite(s["val_loss"])
    assert s["effective"]["matmul_precision"] == "high"
    assert s["effective"]["tf32"] is False and "no effect" in " ".join(s["effective"]["notes"])
    assert s["model_shape"] == {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "vocab_size": 50257}
    assert s["effective"]["sdpa_backends"] is None  # CUDA's kernel switches, which the CPU run says it ignored
    assert any("sdpa_backend=cudnn" in note and "no effect on cpu" in note for note in s["effective"]["notes"])
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    steps = [line for line in lines if '"loss"' in line]
    assert len(steps) == 4


@pytest.mark.slow
def test_a_failing_logger_never_ends_the_run(tmp_path, shakespeare_path, monkeypatch, caplog):
    import wandb

    class BrokenRun:
        summary = {}

        def log(self, *args, **kwargs):
            raise ConnectionError("wandb server unreachable")

    monkeypatch.setattr(wandb, "init", lambda **kwargs: BrokenRun())
    s, _ = run_train(tmp_path, shakespeare_path, "logger.wandb.mode=offline", "train.steps=2", "train.batch_size=2")
    assert s["status"] == "ok" and s["steps"] == 2
    assert "wandb: could not log (ConnectionError: wandb server unreachable)" in caplog.text

    def refuse(**kwargs):
        raise RuntimeError("no API key")

    monkeypatch.setattr(wandb, "init", refuse)
    s, _ = run_train(tmp_path, shakespeare_path, "logger.wandb.mode=online", "train.steps=1", "train.batch_size=2",
                     name="run2")
    assert s["status"] == "ok" and "wandb: could not start (RuntimeError: no API key)" in caplog.text


def test_the_loop_does_not_hold_the_logits_through_backward(tmp_path, shakespeare_path, monkeypatch):
    # (B, T, vocab) logits are 1.5 GiB at B=16 in bf16: the loop must let them go before backward
    import weakref

    alive_in_backward = []
    real_forward = GPT.forward

    def forward(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        marker = torch.empty(8)  # stands for the logits: referenced only by what the loop keeps
        ref = weakref.ref(marker)
        if loss.requires_grad:  # a training micro-step, not validation
            loss.register_hook(lambda grad: alive_in_backward.append(ref() is not None))
        return marker, loss

    monkeypatch.setattr(GPT, "forward", forward)
    s, _ = run_train(tmp_path, shakespeare_path, "train.steps=1", "train.batch_size=2", "train.seq_len=32",
                     "train.total_batch_size=128")
    assert s["status"] == "ok" and alive_in_backward == [False, False]
    # the probe itself: a caller that keeps the output (logits and loss) through backward is seen doing so
    kept = GPT(GPTConfig.from_preset("tiny"))(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    kept[1].backward()
    assert alive_in_backward[-1] is True


@pytest.mark.slow
def test_validation_does_not_recompile_the_compiled_model(tmp_path, shakespeare_path, monkeypatch):
    # dynamo guards on grad mode and module.training: evaluating the compiled model under no_grad/eval()
    # would compile a second graph; validation runs the plain module instead. The eager backend keeps
    # this test to dynamo's tracing (no C++ build), which is where recompilation is decided.
    import functools

    import torch._dynamo

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    s, run_dir = run_train(tmp_path, shakespeare_path, "train.compile=true", "train.steps=3", "train.batch_size=2",
                           "train.seq_len=32", "train.val_every=1", "train.total_batch_size=128")
    assert s["status"] == "ok" and s["effective"]["compiled"] is True
    assert len([line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]) == 3


def test_sdpa_backend_switches_are_set_whole_for_every_job():
    from gpt2.training.devices import enable_sdpa_backends, enabled_sdpa_backends, set_sdpa_backends

    before = enabled_sdpa_backends()
    try:
        set_sdpa_backends("cudnn")  # one kernel, math kept as the fallback
        assert enabled_sdpa_backends() == ["cudnn", "math"]
        set_sdpa_backends("efficient")  # the next job's choice replaces it, nothing left over
        assert enabled_sdpa_backends() == ["efficient", "math"]
        set_sdpa_backends("auto")
        assert enabled_sdpa_backends() == ["flash", "efficient", "cudnn", "math"]
    finally:
        enable_sdpa_backends(before)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_compile_without_a_compiler_is_one_line(monkeypatch, device):
    from gpt2.errors import UsageError
    from gpt2.training.devices import check_compiler

    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(UsageError, match=r"train.compile=true needs a C(\+\+)? compiler .* none was found") as e:
        check_compiler(torch.device(device))
    assert "\n" not in str(e.value) and "train.compile=false" in str(e.value)


def test_a_long_run_says_how_long_after_its_first_step(tmp_path, shakespeare_path, monkeypatch, caplog):
    import gpt2.training.summary

    caplog.set_level(logging.INFO, logger="gpt2")
    monkeypatch.setattr(gpt2.training.summary, "LONG_RUN_S", 0.0)  # every run counts as long here
    monkeypatch.setattr(GPT, "num_params", lambda self, non_embedding=True: 124_000_000)  # as GPT-2 124M
    s, _ = run_train(tmp_path, shakespeare_path, "train.steps=3", "train.batch_size=2", "train.seq_len=32")
    assert s["status"] == "ok"
    said = [r.getMessage() for r in caplog.records if "steps left take about" in r.getMessage()]
    assert len(said) == 1 and "the 2 steps left" in said[0] and "on cpu" in said[0]
    assert "python run.py +stage=baseline model=tiny train.device=cpu train.steps=20" in said[0]
    assert any("validating on 1 held-out batches of 2x32" in r.getMessage() for r in caplog.records)


def test_no_validation_is_said_once(tmp_path, shakespeare_path, caplog):
    s, _ = run_train(tmp_path, shakespeare_path, "train.steps=2", "train.batch_size=2", "train.seq_len=32",
                     "train.val_every=1", "data.val_fraction=0")
    assert s["status"] == "ok" and s["val_loss"] is None
    assert s["val_note"].startswith("no validation: the held-out split (0 tokens, data.val_fraction=0.0)")
    assert sum("no validation:" in r.getMessage() for r in caplog.records) == 1


def test_wandb_gets_validation_and_mfu_and_a_resumed_run_continues_its_wandb_run(tmp_path, shakespeare_path,
                                                                                    monkeypatch):
    import wandb

    inits, logged = [], []

    class FakeRun:
        summary = {}

        def __init__(self, **kwargs):
            inits.append(kwargs)
            self.id = kwargs.get("id") or f"run{len(inits)}"

        def log(self, data, step):
            logged.append((step, data))

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kwargs: FakeRun(**kwargs))
    common = ["logger.wandb.mode=offline", "train.batch_size=2", "train.seq_len=32"]
    first, first_dir = run_train(tmp_path, shakespeare_path, *common, "train.steps=2", name="first")
    assert first["wandb_run_id"] == "run1" and "id" not in inits[0]
    assert [s for s, d in logged if "val_loss" in d] == [1]  # the final validation
    assert all(0 < d["mfu"] < 1 for _, d in logged if "loss" in d)
    second, _ = run_train(tmp_path, shakespeare_path, *common, "train.steps=3", f"train.resume={first_dir}",
                          name="second")
    assert inits[1]["id"] == "run1" and inits[1]["resume"] == "allow" and second["wandb_run_id"] == "run1"


@pytest.mark.slow
def test_samples_during_training_leave_the_run_unchanged(tmp_path, shakespeare_path):
    # build-nanogpt prints samples every 250 steps; drawing them must not move the run's own random numbers
    common = ["train.steps=2", "train.batch_size=2", "train.seq_len=32", "train.checkpoint_every=2"]
    plain, plain_dir = run_train(tmp_path, shakespeare_path, *common, name="plain")
    sampled, sampled_dir = run_train(tmp_path, shakespeare_path, *common, "train.sample_every=1", name="sampled")
    rows = [json.loads(line) for line in (sampled_dir / "metrics.jsonl").read_text().splitlines()]
    samples = [r for r in rows if "samples" in r]
    assert [r["step"] for r in samples] == [0, 1] and all(len(r["samples"]) == 4 for r in samples)
    assert all(text.startswith("Hello, I'm a language model,") for text in samples[0]["samples"])
    assert sampled["final_loss"] == plain["final_loss"]
    for key, value in saved_weights(plain_dir).items():
        torch.testing.assert_close(saved_weights(sampled_dir)[key], value, rtol=0, atol=0)
