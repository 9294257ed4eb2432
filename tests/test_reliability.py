"""Reliability (issue 6): checkpoints and exact resume, atomic writes, Ctrl-C / SIGTERM, validation,
divergence, and bad input refused with one line, a non-zero exit, no traceback and nothing overwritten.

In-process runs (run_train) where the loop's behaviour is the point; `python run.py` in a subprocess
where the command line is: exit codes, what the user reads, what is left on disk.
"""

import io
import logging
import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gpt2.training import checkpoint
from gpt2.training import metrics
from gpt2.training import loop as train_module
from gpt2.training.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from gpt2.errors import UsageError
from gpt2.model.gpt import GPT, GPTConfig
from gpt2.training.optim import build_optimizer
from helpers import (CONF, REPO, SHAPE_KEYS, TINY, compose_with, digest, output_of, records, run_py, run_train,
                     strict_json)

SMALL = ["train.batch_size=2", "train.seq_len=32"]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    """One token cache for the whole module: each fresh one costs a second of tokenizing."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def data_args(shakespeare_path, data_cache):
    return [f"data.path={shakespeare_path}", f"data.cache_dir={data_cache}"]


@pytest.fixture(scope="module")
def run(shakespeare_path, data_cache):
    """run_train (in-process) with the module's token cache: run(tmp_path, *overrides) -> (summary, run_dir)."""
    def run(tmp_path, *overrides, name="run"):
        return run_train(tmp_path, shakespeare_path, f"data.cache_dir={data_cache}", *overrides, name=name)
    return run


def cli_args(data_args, run_dir, *overrides):
    return [*TINY, *data_args, f"hydra.run.dir={run_dir}", *overrides]


def tiny_checkpoint(path, config_yaml="model:\n  name: tiny\n", **sizes):
    """A real checkpoint of an untrained tiny model (optionally resized), as a run writes it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", **sizes))
    optimizer = build_optimizer(model, compose_with([]).optim, torch.device("cpu"))
    save_checkpoint(path, model=model, optimizer=optimizer, step=1, data_state={"next_chunk": 1},
                    config_yaml=config_yaml,
                    model_shape={k: getattr(model.config, k) for k in SHAPE_KEYS})
    return path


def interrupt_after(monkeypatch, last_step):
    """Send this process SIGINT while step `last_step` is being logged, as a user's Ctrl-C would."""
    original = metrics.StepLog.step

    def step(self, record, world_size):
        original(self, record, world_size)
        if record["step"] == last_step:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(metrics.StepLog, "step", step)


def crash_at(monkeypatch, bad_step):
    """A hard failure (a preemption, a lost node) when step `bad_step` is logged: no chance to save."""
    original = metrics.StepLog.step

    def step(self, record, world_size):
        if record["step"] == bad_step:
            raise RuntimeError("node lost")
        original(self, record, world_size)

    monkeypatch.setattr(metrics.StepLog, "step", step)


# ---- checkpoints ----------------------------------------------------------------------------------

@pytest.mark.parametrize("steps, saved_at", [(5, [2, 4, 5]), (4, [2, 4])])
@pytest.mark.slow
def test_checkpoint_every_n_steps_and_at_the_end(tmp_path, run, monkeypatch, steps, saved_at):
    saved = []
    original = checkpoint.save_checkpoint
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda path, **kw: (saved.append(kw["step"]),
                                                                            original(path, **kw)))
    summary, run_dir = run(tmp_path, *SMALL, f"train.steps={steps}", "train.checkpoint_every=2")
    assert summary["status"] == "ok"
    assert saved == saved_at  # every 2 steps, then the end; never the same step twice
    state = torch.load(run_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert set(state) == {"model", "optimizer", "step", "data", "rng", "config", "model_shape", "wandb_run_id"}
    assert state["step"] == steps and state["data"] == {"next_chunk": steps}
    assert isinstance(state["rng"]["torch"], torch.Tensor)
    assert "checkpoint_every: 2" in state["config"] and "name: tiny" in state["config"]  # the resolved config
    assert state["model_shape"]["n_layer"] == 2 and state["optimizer"]["state"]  # AdamW moments are there
    assert not list(run_dir.glob(".*.tmp"))  # no temporary file left over


@pytest.mark.slow
def test_a_single_run_keeps_its_final_model_a_sweep_job_only_when_asked(tmp_path, run, data_args, caplog):
    summary, run_dir = run(tmp_path, *SMALL, "train.steps=2")  # checkpoint_every=0, the default
    assert summary["status"] == "ok" and torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)["step"] == 2
    cfg = compose_with(["model=tiny", "train.device=cpu", *SMALL, "train.steps=2", "train.val_batches=1", *data_args])
    job_dir = tmp_path / "sweep_job"
    job_dir.mkdir()
    with caplog.at_level(logging.INFO, logger="gpt2"):
        summary = train_module.train(cfg, job_dir, {"stage": "baseline", "job_num": 0})
    assert summary["status"] == "ok" and not (job_dir / CHECKPOINT_NAME).exists()
    assert "no checkpoint kept: a sweep's jobs keep one only with train.checkpoint_every=N" in caplog.text


def test_a_write_that_fails_midway_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = tiny_checkpoint(tmp_path / CHECKPOINT_NAME)
    before = path.read_bytes()

    real_save = torch.save

    def half_then_die(obj, f):  # a full disk half-way through the new checkpoint
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_die)
    with pytest.raises(OSError, match="disk full"):
        tiny_checkpoint(path, n_layer=1)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(str(path))["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]  # the partial file is gone


@pytest.mark.slow
def test_a_process_killed_mid_write_leaves_the_old_checkpoint(tmp_path):
    path = tiny_checkpoint(tmp_path / CHECKPOINT_NAME)
    before = path.read_bytes()
    # a real SIGKILL half-way through writing the new checkpoint: no handler, no cleanup runs
    script = (
        "import os, signal, sys\n"
        "from gpt2.files import atomic_write_bytes\n"
        "def write(f):\n"
        "    f.write(b'PK' + b'x' * 1_000_000)\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic_write_bytes(sys.argv[1], write)\n")
    result = subprocess.run([sys.executable, "-c", script, str(path)], cwd=REPO, capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    assert load_checkpoint(str(tmp_path))["step"] == 1  # by its run folder, as train.resume takes it
    (leftover,) = [p for p in tmp_path.iterdir() if p.name != CHECKPOINT_NAME]
    assert leftover.name.startswith(f".{CHECKPOINT_NAME}.") and leftover.stat().st_size > 1_000_000


# ---- resume ---------------------------------------------------------------------------------------

# gpt3-optim: cosine schedule after a 2-step warm-up, AdamW moments, clipping, bf16 autocast; all must resume
RESUMABLE = ["+stage=gpt3-optim", *SMALL, "train.steps=7", "optim.warmup_steps=2", "train.val_every=3",
             "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, run):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    summary, run_dir = run(tmp, *RESUMABLE)
    assert summary["status"] == "ok"
    return summary, run_dir


def assert_continues(resumed_dir, full_dir, first_step):
    full, resumed = records(full_dir), records(resumed_dir)
    assert [r["step"] for r in resumed] == list(range(first_step, 7))  # the resumed run's folder: steps k..N-1
    for a, b in zip(resumed, full[first_step:]):
        for key in ("step", "loss", "lr", "grad_norm"):
            assert a[key] == b[key], f"step {b['step']}: {key} {a[key]} != {b[key]}"
    assert len({r["lr"] for r in full}) > 3  # the schedule really moves, so a restart at step 0 would show
    val_full = [r for r in records(full_dir, "val_loss") if r["step"] >= first_step]
    assert records(resumed_dir, "val_loss") == val_full
    final_full = torch.load(full_dir / CHECKPOINT_NAME, weights_only=True)
    final_resumed = torch.load(resumed_dir / CHECKPOINT_NAME, weights_only=True)
    assert final_resumed["step"] == final_full["step"] == 7
    for key, tensor in final_full["model"].items():
        assert torch.equal(final_resumed["model"][key], tensor), key


@pytest.mark.slow
def test_resume_after_ctrl_c_equals_the_uninterrupted_run(tmp_path, run, monkeypatch, uninterrupted):
    full_summary, full_dir = uninterrupted
    interrupt_after(monkeypatch, last_step=2)  # mid-way between the checkpoints at 2 and 4
    first, first_dir = run(tmp_path, *RESUMABLE, name="first")
    monkeypatch.undo()
    assert first["status"] == "interrupted" and first["steps"] == 3
    assert torch.load(first_dir / CHECKPOINT_NAME, weights_only=True)["step"] == 3  # saved on the way out
    resumed, resumed_dir = run(tmp_path, *RESUMABLE, f"train.resume={first_dir}", name="resumed")
    assert resumed["status"] == "ok" and resumed["steps"] == 7
    assert resumed["resumed_from"] == str(first_dir / CHECKPOINT_NAME) and resumed["start_step"] == 3
    assert resumed["final_loss"] == full_summary["final_loss"]
    assert resumed["val_loss"] == full_summary["val_loss"]
    assert_continues(resumed_dir, full_dir, first_step=3)


@pytest.mark.slow
def test_resume_after_a_crash_from_the_last_periodic_checkpoint(tmp_path, run, monkeypatch, uninterrupted):
    crash_at(monkeypatch, bad_step=5)  # steps 0-4 done, the last checkpoint is from step 4
    with pytest.raises(RuntimeError, match="node lost"):
        run(tmp_path, *RESUMABLE, name="crashed")
    monkeypatch.undo()
    saved = tmp_path / "crashed" / CHECKPOINT_NAME
    assert torch.load(saved, weights_only=True)["step"] == 4
    resumed, resumed_dir = run(tmp_path, *RESUMABLE, f"train.resume={saved}", name="resumed")
    assert resumed["status"] == "ok"
    assert_continues(resumed_dir, uninterrupted[1], first_step=4)


@pytest.mark.slow
def test_resume_warns_about_changed_settings(tmp_path, run, caplog):
    _, first_dir = run(tmp_path, *SMALL, "train.steps=2", "train.checkpoint_every=2", name="first")
    with caplog.at_level(logging.WARNING, logger="gpt2"):
        run(tmp_path, *SMALL, "train.steps=3", "optim.lr=1e-3", f"train.resume={first_dir}", name="resumed")
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "optim.lr: 0.0003 -> 0.001" in warning and "train.steps: 2 -> 3" in warning
    assert f"-> {first_dir}" not in warning  # train.resume differs by nature: not a change to warn about


@pytest.mark.slow
def test_resume_continues_with_this_runs_optimizer_settings(tmp_path, run, caplog):
    # torch's load_state_dict would bring back the saved betas, eps and weight decay over the run's config
    _, first_dir = run(tmp_path, *SMALL, "train.steps=2", "train.checkpoint_every=2", name="first")
    gpt3 = ["optim.betas=[0.9,0.95]", "optim.weight_decay=0.1", "optim.eps=1e-6", "optim.fused=true"]
    with caplog.at_level(logging.WARNING, logger="gpt2"):
        resumed, _ = run(tmp_path, *SMALL, "train.steps=3", *gpt3, f"train.resume={first_dir}", name="resumed")
    optimizer = resumed["effective"]["optimizer"]
    assert resumed["status"] == "ok" and resumed["start_step"] == 2
    assert optimizer["betas"] == [0.9, 0.95] and optimizer["eps"] == 1e-6
    assert optimizer["weight_decay_groups"][0]["weight_decay"] == 0.1
    assert "the optimizer continues with this run's settings" in caplog.text and "betas" in caplog.text


def test_checkpoint_keeps_only_the_runs_own_gpu_rng(monkeypatch):
    # a checkpoint from a machine with 8 GPUs must resume on one with 1: one device's state, not all of them
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([7, int(device.index)]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((state.tolist(), device)))
    state = checkpoint.rng_state(torch.device("cuda", 3))
    assert state["cuda"].tolist() == [7, 3]
    checkpoint.set_rng_state(state, torch.device("cuda", 0))
    assert calls == [([7, 3], torch.device("cuda", 0))]
    calls.clear()  # an older checkpoint holding every GPU's state: the run's own index, or the last one there is
    checkpoint.set_rng_state({"torch": state["torch"], "cuda": [torch.tensor([0]), torch.tensor([1])]},
                             torch.device("cuda", 5))
    assert calls == [([1], torch.device("cuda", 5))]
    assert "cuda" not in checkpoint.rng_state(torch.device("cpu"))


def test_no_checkpoint_at_all_when_saving_is_off(tmp_path, run, monkeypatch):
    # benchmarks: a SIGTERM at the end of the budget must not start a 1.5 GB write
    interrupt_after(monkeypatch, last_step=1)
    summary, run_dir = run(tmp_path, *SMALL, "train.steps=4", "train.checkpoint_every=1",
                           "train.save_checkpoints=false")
    assert summary["status"] == "interrupted" and summary["steps"] == 2
    assert not (run_dir / CHECKPOINT_NAME).exists()
    assert "no checkpoint was written" in summary["error"]


# ---- Ctrl-C and SIGTERM ---------------------------------------------------------------------------

def signal_run(run_dir, args, signum, ready):
    """Start `python run.py args`, send `signum` once ready(run_dir) holds; (exit code, stdout + stderr)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready(run_dir):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never got there"
            time.sleep(0.01)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in out
    return proc.returncode, out


def two_steps_logged(run_dir):
    metrics_file = run_dir / "metrics.jsonl"
    return metrics_file.is_file() and len(metrics_file.read_text().splitlines()) >= 2


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"])
@pytest.mark.slow
def test_signal_finishes_the_step_saves_and_exits_non_zero(tmp_path, run, data_args, signum):
    run_dir = tmp_path / "run"
    code, out = signal_run(run_dir, cli_args(data_args, run_dir, "train.steps=100000"), signum, two_steps_logged)
    assert code == 1
    summary = strict_json(run_dir / "summary.json")
    assert summary["status"] == "interrupted"
    assert summary["steps"] == len(records(run_dir)) >= 2  # the current step was finished and logged
    assert f"train.resume={run_dir}" in summary["error"] and f"train.resume={run_dir}" in out
    assert torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)["step"] == summary["steps"]
    resumed, resumed_dir = run(tmp_path, f"train.steps={summary['steps'] + 2}", *SMALL,
                               f"train.resume={run_dir}", name="resumed")
    assert resumed["status"] == "ok"
    assert [r["step"] for r in records(resumed_dir)] == [summary["steps"], summary["steps"] + 1]


def test_a_signal_during_the_final_validation_still_saves_the_last_step(tmp_path, run, monkeypatch):
    # checkpoint_every=0 (the default): without this, every trained step would be lost
    original = train_module.Run.validate

    def validate(self, step):
        signal.raise_signal(signal.SIGTERM)
        return original(self, step)

    monkeypatch.setattr(train_module.Run, "validate", validate)
    summary, run_dir = run(tmp_path, *SMALL, "train.steps=2")
    assert summary["status"] == "interrupted" and summary["steps"] == 2
    assert summary["val_loss"] is not None  # the validation in flight was finished
    assert torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)["step"] == 2
    assert f"train.resume={run_dir}" in summary["error"]


def _save_that(monkeypatch, action, on_write=3, on_save=1):
    """checkpoint's torch.save, whose call number `on_save` calls action() (a signal, a full disk) at its
    file write number `on_write`; the other calls save normally."""
    real_save = torch.save
    saves = [0]

    def save(obj, f):
        saves[0] += 1
        writes = [0]
        real_write = f.write

        def write(data):
            writes[0] += 1
            if saves[0] == on_save and writes[0] == on_write:
                action()
            return real_write(data)

        f.write = write
        return real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", save)


@pytest.mark.slow
def test_a_second_ctrl_c_while_saving_keeps_the_previous_checkpoint(tmp_path, run, monkeypatch):
    interrupt_after(monkeypatch, last_step=1)  # the first Ctrl-C: finish the step, then save and stop
    _save_that(monkeypatch, lambda: signal.raise_signal(signal.SIGINT), on_save=2)  # the second, while saving
    with pytest.raises(KeyboardInterrupt):  # stops at once, as a second Ctrl-C does (run.py: exit 130)
        run(tmp_path, *SMALL, "train.steps=4", "train.checkpoint_every=1")
    run_dir = tmp_path / "run"
    assert torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)["step"] == 1  # the previous one, intact
    assert not list(run_dir.glob(".checkpoint.pt.*.tmp"))  # and no half-written file beside it


def test_a_full_disk_while_saving_is_said_plainly_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    path = tiny_checkpoint(tmp_path / CHECKPOINT_NAME)
    before = digest(path)

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device")

    _save_that(monkeypatch, disk_full)
    with pytest.raises(OSError, match=f"no space left on the device of {tmp_path} .writing checkpoint.pt.; the "
                                      "previous checkpoint.pt is kept"):
        tiny_checkpoint(path)
    assert digest(path) == before and not list(tmp_path.glob(".checkpoint.pt.*.tmp"))


def test_a_run_log_that_cannot_be_written_says_so_once(tmp_path, capsys):
    from gpt2.runs.job import RunLogHandler

    handler = RunLogHandler(tmp_path / "run.log")
    handler.stream.close()
    handler.stream = open("/dev/full", "w")  # every write fails with "No space left on device"
    logger = logging.getLogger("gpt2.test_full_disk")
    logger.addHandler(handler)
    try:
        for i in range(5):
            logger.error(f"line {i}")
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err and "No space left on device" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_sigterm_during_set_up_still_records_the_interruption(tmp_path, shakespeare_path):
    # a fresh token cache: tokenizing takes about a second, between summary.json ("running") and step 0
    run_dir = tmp_path / "run"
    args = [*TINY, f"data.path={shakespeare_path}", f"data.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={run_dir}", "train.steps=100000"]
    code, out = signal_run(run_dir, args, signal.SIGTERM, lambda d: (d / "summary.json").is_file())
    assert code == 130  # stopped at once: there is no step to finish
    assert out.splitlines() == ["interrupted: stopped at once; nothing was saved after the last checkpoint"]
    assert strict_json(run_dir / "summary.json")["status"] == "interrupted"  # not "running" forever


# ---- validation -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_args):
    tmp = tmp_path_factory.mktemp("finished")
    run_dir = tmp / "run"
    result = run_py(*cli_args(data_args, run_dir, "train.steps=5", "train.val_every=2"))
    assert result.returncode == 0, output_of(result)[-3000:]
    return tmp, run_dir


@pytest.mark.slow
def test_validation_loss_in_metrics_summary_and_report(finished_run):
    tmp, run_dir = finished_run
    vals = records(run_dir, "val_loss")
    assert [v["step"] for v in vals] == [1, 3, 4]  # after steps 2 and 4 (val_every=2), and at the end
    assert all(math.isfinite(v["val_loss"]) for v in vals)
    summary = strict_json(run_dir / "summary.json")
    assert summary["val_loss"] == vals[-1]["val_loss"]
    from gpt2.reporting.build import build_report

    paths = build_report([run_dir], out_dir=tmp / "report")
    md = paths["md"].read_text()
    assert "val loss" in md and f"{summary['val_loss']:.3f}" in md


@pytest.mark.slow
def test_a_finished_run_folder_is_never_overwritten(finished_run, data_args):
    tmp, run_dir = finished_run
    files = sorted(p for p in run_dir.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"summary.json", "metrics.jsonl", "config.yaml", "run.log"}
    before = {p: digest(p) for p in files}
    result = run_py(*cli_args(data_args, run_dir, "train.steps=2"))
    assert result.returncode == 2
    assert output_of(result).strip().splitlines() == [
        f"error: {run_dir} already holds a run (status: ok); nothing was overwritten. Choose another "
        f"hydra.run.dir=..., or continue that run with train.resume={run_dir}"]
    assert sorted(p for p in run_dir.rglob("*") if p.is_file()) == files
    assert {p: digest(p) for p in files} == before


@pytest.mark.slow
def test_a_checkpoint_without_a_summary_is_a_run_too(tmp_path, data_args):
    run_dir = tmp_path / "run"
    path = tiny_checkpoint(run_dir / CHECKPOINT_NAME)
    before = digest(path)
    result = run_py(*cli_args(data_args, run_dir, "train.steps=1", "train.checkpoint_every=1"))
    assert result.returncode == 2 and "already holds a run (status: unknown: checkpoint.pt but no summary.json)" \
        in output_of(result)
    assert digest(path) == before and sorted(p.name for p in run_dir.iterdir()) == [CHECKPOINT_NAME]


@pytest.mark.slow
def test_a_folder_without_a_checkpoint_is_never_offered_for_resuming(tmp_path, data_args):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text('{"status": "failed"}')
    result = run_py(*cli_args(data_args, run_dir, "train.steps=1"))
    assert result.returncode == 2 and output_of(result).strip().splitlines() == [
        f"error: {run_dir} already holds a run (status: failed); nothing was overwritten. Choose another "
        "hydra.run.dir=..."]


@pytest.mark.slow
def test_two_runs_started_into_one_folder_at_once(tmp_path, data_args):
    # the other run holds the folder's lock (as a live process would); the second start is refused and
    # writes nothing; the lock dies with its process, so a killed run never blocks the folder for good
    import fcntl

    from gpt2.runs.folders import LOCK_NAME

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / LOCK_NAME, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("4242 on elsewhere\n")
        lock.flush()
        result = run_py(*cli_args(data_args, run_dir, "train.steps=1"))
        assert result.returncode == 2
        assert output_of(result).strip().splitlines() == [
            f"error: {run_dir} is in use by another run (process 4242 on elsewhere); nothing was written. Choose "
            "another hydra.run.dir=..., or wait for that run to end"]
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]
    result = run_py(*cli_args(data_args, run_dir, "train.steps=1"))  # the holder is gone: the folder is free
    assert result.returncode == 0, output_of(result)
    assert strict_json(run_dir / "summary.json")["status"] == "ok" and not (run_dir / LOCK_NAME).exists()


# ---- divergence -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_args):
    run_dir = tmp_path / "run"
    result = run_py(*cli_args(data_args, run_dir, "train.steps=30", "train.checkpoint_every=1",
                              "optim.name=sgd", "optim.lr=1e6"))
    assert result.returncode == 1
    assert "Traceback" not in output_of(result)
    summary = strict_json(run_dir / "summary.json")
    bad = summary["diverged_at_step"]
    assert summary["status"] == "diverged" and 0 < bad < 30
    assert f"at step {bad}" in summary["error"] and "optim.lr" in summary["error"]
    assert f"the last good checkpoint (step {bad}) is kept in {run_dir}" in summary["error"]
    assert summary["error"] in result.stdout
    assert summary["steps"] == bad and math.isfinite(summary["final_loss"])
    assert [r["step"] for r in records(run_dir)] == list(range(bad))  # every good step, nothing after
    state = load_checkpoint(str(run_dir))
    assert state["step"] == bad  # the weights before the step that blew up
    assert all(torch.isfinite(t).all() for t in state["model"].values())


@pytest.mark.slow
def test_an_infinite_gradient_norm_is_divergence_too(tmp_path, run, monkeypatch):
    # the loss of that step is still finite, but its update (inf or nan gradients) has ruined the weights
    calls = []
    real = train_module.grad_norm_and_clip

    def norm(params, max_norm):
        calls.append(1)
        return torch.tensor(math.inf) if len(calls) == 3 else real(params, max_norm)

    monkeypatch.setattr(train_module, "grad_norm_and_clip", norm)
    summary, run_dir = run(tmp_path, *SMALL, "train.steps=5", "train.checkpoint_every=1")
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == 2 and summary["steps"] == 2
    assert "gradient norm" in summary["error"]
    assert torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)["step"] == 2  # not the ruined step 3


# ---- bad input ------------------------------------------------------------------------------------

def test_bf16_on_a_gpu_without_it(monkeypatch):
    cfg = compose_with(["+stage=bf16"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    with pytest.raises(UsageError, match=r"train.autocast_dtype=bf16, but Tesla V100-SXM2-16GB has no bf16.*"
                                         r"train.autocast_dtype=fp32"):
        train_module.configure_torch(cfg.train, torch.device("cuda", 0))
    train_module.configure_torch(cfg.train, torch.device("cpu"))  # CPUs run bf16 autocast


@pytest.mark.slow
def test_a_corrupt_token_cache_is_rebuilt_during_a_run(tmp_path, shakespeare_path, caplog):
    args = [*SMALL, "train.steps=1", "data.max_chars=20000"]
    run_train(tmp_path, shakespeare_path, *args, name="first")
    (cache,) = (tmp_path / "cache").glob("tokens-*.bin")
    good = cache.read_bytes()
    cache.write_bytes(good[: len(good) // 2])  # truncated, as by a full disk or a copy cut short
    with caplog.at_level(logging.WARNING, logger="gpt2.data.batches"):
        summary, _ = run_train(tmp_path, shakespeare_path, *args, name="second")
    assert summary["status"] == "ok" and "unusable" in caplog.text
    assert cache.read_bytes() == good


def _write_pickle_bomb(path, marker):
    class Bomb:  # unpickling this would run a shell command
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"model": Bomb()}, path)


# id: (overrides, what the message must say, who reports it). "usage": our one line "error: ..." and exit 2,
# from the job (a failed summary.json); "early": the same line, refused before the run folder is made (pure
# config checks, in the run's Hydra callback); "hydra": Hydra refuses the config while composing it, before
# any folder is made (exit 1, a short message)
BAD_INPUT = {
    "unknown-stage": (["+stage=warp-speed"], "Could not find 'stage/warp-speed'", "hydra"),
    "unknown-model-preset": (["model=gpt5"], "Could not find 'model/gpt5'", "hydra"),
    "typo-in-key": (["train.bath_size=2"], "Key 'bath_size' not in 'TrainConfig'", "hydra"),
    "wrong-type": (["train.batch_size=two"], "Value 'two' of type 'str' could not be converted to Integer",
                   "hydra"),
    "wrong-choice": (["train.device=tpu"], "Invalid value 'tpu', expected one of [auto, cuda, mps, cpu]", "hydra"),
    "unknown-model-name": (["model.name=gpt5"], "model.name=gpt5 is not a preset", "early"),
    "zero-batch-size": (["train.batch_size=0"], "train.batch_size=0 must be positive", "early"),
    "negative-steps": (["train.steps=-1"], "train.steps=-1 must not be negative", "early"),
    "negative-width": (["model.n_embd=-64"], "model.n_embd=-64 must be positive", "early"),
    "heads-do-not-divide-width": (["model.n_head=3"], "model.n_head=3 does not divide model.n_embd=64", "early"),
    "seq-len-above-context": (["train.seq_len=65"], "train.seq_len=65 is longer than the model's context of 64",
                              "early"),
    "total-batch-not-divisible": (["train.total_batch_size=100"],
                                  "train.total_batch_size=100 is not divisible by B*T*world = 2*32*1 = 64", "early"),
    "cuda-without-cuda": (["train.device=cuda"], "train.device=cuda, but torch sees no CUDA device", "early"),
    "data-missing": (["data.path={tmp}/nowhere.txt"], "data.path={tmp}/nowhere.txt: no such file", "usage"),
    "data-empty": (["data.path={tmp}/empty.txt"], "data.path={tmp}/empty.txt is empty", "usage"),
    "data-not-text": (["data.path={tmp}/image.png"], "data.path={tmp}/image.png is not UTF-8 text", "usage"),
    "resume-nothing-there": (["train.resume={tmp}"], "train.resume={tmp}: no checkpoint at", "early"),
    "checkpoint-truncated": (["train.resume={tmp}/truncated.pt"], "truncated.pt is corrupt or truncated", "usage"),
    "checkpoint-garbage": (["train.resume={tmp}/garbage.pt"], "garbage.pt is corrupt or truncated", "usage"),
    "checkpoint-with-code": (["train.resume={tmp}/bomb.pt"], "bomb.pt is corrupt or truncated", "usage"),
    "checkpoint-other-model": (["train.resume={tmp}/wide.pt"],
                               "the checkpoint is for a different model (n_embd: checkpoint 128 vs run 64)", "usage"),
    "checkpoint-other-optimizer": (["+stage=gpt3-optim", "model.vocab_size=50257", "train.resume={tmp}/good.pt"],
                                   "the checkpoint does not fit this run's model or optimizer", "usage"),
    "checkpoint-of-adamw-resumed-as-sgd": (["optim.name=sgd", "train.resume={tmp}/adamw.pt"],
                                           "the checkpoint was trained with optim.name=adamw, this run asks for "
                                           "optim.name=sgd", "usage"),
    "lr-nan": (["optim.lr=nan"], "optim.lr=nan must be a positive number", "early"),
    "betas-out-of-range": (["optim.betas=[1.5,0.9]"], "optim.betas=[1.5, 0.9] must be two numbers in [0, 1)", "early"),
    "betas-one-value": (["optim.betas=[0.9]"], "optim.betas=[0.9] must be two numbers in [0, 1)", "early"),
    "eps-negative": (["optim.eps=-1"], "optim.eps=-1.0 must be a small positive number", "early"),
    "min-lr-ratio-negative": (["optim.min_lr_ratio=-5"], "optim.min_lr_ratio=-5.0 must be in [0, 1]", "early"),
    "momentum-one": (["optim.momentum=1"], "optim.momentum=1.0 must be in [0, 1)", "early"),
    "grad-clip-zero": (["optim.grad_clip=0"], "optim.grad_clip=0.0 must be positive", "early"),
    "vocab-below-tokenizer": (["model.vocab_size=100"], "model.vocab_size=100 is smaller than the GPT-2 tokenizer's "
                                                        "50257 ids", "early"),
    "val-fraction-one": (["data.val_fraction=1"], "data.val_fraction=1.0 must be in [0, 1)", "early"),
    "cache-dir-is-a-file": (["data.cache_dir={tmp}/empty.txt"], "data.cache_dir={tmp}/empty.txt is a file", "early"),
    "init-from-another-architecture": (["model.init_from={tmp}/../bert"],
                                       "model.init_from={tmp}/../bert: {tmp}/../bert holds a bert model, not GPT-2",
                                       "usage"),
    "init-from-with-sizes": (["model.init_from={tmp}", "model.n_embd=128"],
                             "model.n_embd=128 cannot be combined with model.init_from={tmp}", "early"),
    # refused before Hydra starts (a stage name becomes a folder name), or before it makes the folder
    "stage-name-is-a-path": (["stage.name=../../x"], "stage.name='../../x' is not a plain name", "early"),
    "output-folder-not-writable": (["hydra.run.dir=/proc/gpt2-speedrun/run"],
                                   "hydra.run.dir=/proc/gpt2-speedrun/run: cannot write there", "early"),
}


@pytest.fixture(scope="module")
def refusals(tmp_path_factory, data_args):
    """Every BAD_INPUT case run once, a few at a time (each is a Python start-up of ~2 s): the files the
    cases point at, their digests before the runs, and {case: (run folder, completed process)}."""
    tmp = tmp_path_factory.mktemp("bad_input")
    files = tmp / "files"
    files.mkdir()
    (files / "empty.txt").write_bytes(b"")
    (files / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    good = tiny_checkpoint(files / "good.pt").read_bytes()
    (files / "truncated.pt").write_bytes(good[: len(good) // 2])
    (files / "garbage.pt").write_bytes(os.urandom(4096))
    _write_pickle_bomb(files / "bomb.pt", tmp / "pwned")
    tiny_checkpoint(files / "wide.pt", n_embd=128)
    tiny_checkpoint(files / "adamw.pt", config_yaml="model:\n  name: tiny\noptim:\n  name: adamw\n")
    from transformers import BertConfig, BertModel
    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp / "bert")
    digests = {p: digest(p) for p in files.iterdir()}

    def attempt(case):
        overrides = [o.format(tmp=files) for o in BAD_INPUT[case][0]]
        return tmp / case, run_py(*cli_args(data_args, tmp / case, "train.steps=2", *overrides))

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        results = dict(zip(BAD_INPUT, pool.map(attempt, BAD_INPUT)))
    return files, digests, results


@pytest.mark.parametrize("case", BAD_INPUT)
@pytest.mark.slow
def test_bad_input_is_one_clear_line(case, refusals):
    if case == "cuda-without-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    files, digests, results = refusals
    run_dir, result = results[case]
    _, expected, who = BAD_INPUT[case]
    out = output_of(result)
    assert "Traceback" not in out
    assert expected.format(tmp=files) in out
    if who == "usage":
        assert result.returncode == 2
        assert out.strip().splitlines() == [f"error: {strict_json(run_dir / 'summary.json')['error']}"]
        assert strict_json(run_dir / "summary.json")["status"] == "failed"
        assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / CHECKPOINT_NAME).exists()
    elif who == "early":
        assert result.returncode == 2 and len(out.strip().splitlines()) == 1 and out.startswith("error: ")
        assert not run_dir.exists()
    else:
        assert result.returncode == 1
        # Hydra's own message, not a stack trace: a few lines, and one per option it lists for a missing stage
        assert "Traceback" not in out and len(out.strip().splitlines()) <= 12 + len(list((CONF / "stage").iterdir()))
        assert not run_dir.exists()  # refused while composing: no folder, nothing written
    assert {p: digest(p) for p in files.iterdir()} == digests  # no input file was touched
    assert not (files.parent / "pwned").exists()  # the checkpoint's pickled code never ran
