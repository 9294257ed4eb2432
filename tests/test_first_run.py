"""A newcomer's first hour (issue 11): fast --help and TAB completion, progress on long silent work, bad
settings refused before a run folder is made, and torchrun's command recorded as typed."""

import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from gpt2 import distributed
from gpt2.training import run_state as training_run
from gpt2.distributed import Ranks
from gpt2.model.gpt import GPT, GPTConfig
from helpers import REPO, TINY_DDP, launch, run_py, run_train


# ---- --help and TAB completion never load torch -----------------------------------------------------

def imported_modules(*args, env=None):
    """`python -X importtime run.py args`: (stdout, the top-level modules it imported)."""
    result = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "run.py"), *args], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.rsplit("|", 1)[-1] for line in result.stderr.splitlines() if line.startswith("import time:")]
    return result.stdout, {line.strip() for line in lines if not line.startswith("  ")}


@pytest.mark.parametrize("args, expected", [
    (["--help"], "== Stages"),
    (["+stage=flash", "--cfg", "job"], "attention: flash"),
    (["-sc", "install=bash"], "hydra_bash_completion"),
    (["-sc", "query=bash"], "+stage=flash"),  # the shell asks with COMP_LINE, as after `python run.py +stage=`
])
@pytest.mark.slow
def test_help_and_completion_do_not_load_torch(args, expected):
    env = dict(os.environ, COMP_LINE="python run.py +stage=", COMP_POINT="21")
    out, modules = imported_modules(*args, env=env)
    assert expected in out
    assert "torch" not in modules and "gpt2.runs.job" not in modules and "gpt2.training.loop" not in modules


# ---- bad settings are refused before the run folder is made -----------------------------------------

@pytest.mark.slow
def test_torchrun_refuses_a_bad_batch_once_and_makes_no_folder(tmp_path, shakespeare_path):
    result = launch(2, [*TINY_DDP, f"data.path={shakespeare_path}", "train.steps=1", "train.total_batch_size=192"],
                    tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert out.count("error: train.total_batch_size=192 is not divisible by B*T*world = 2*32*2 = 128") == 1
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_sweep_job_that_fails_a_check_is_never_offered_for_resuming(tmp_path, shakespeare_path):
    # a sweep's jobs are checked in the job (their settings exist only there): its folder records the failure,
    # and a second start into that sweep folder is refused without advising train.resume (no checkpoint there)
    sweep = tmp_path / "sweep"
    args = ["-m", "model=tiny", "train.device=cpu", "train.batch_size=2", "train.seq_len=32,65", "train.steps=1",
            "train.val_batches=1", f"data.path={shakespeare_path}", f"data.cache_dir={tmp_path / 'cache'}",
            f"hydra.sweep.dir={sweep}"]
    result = run_py(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    failed = json.loads((sweep / "1_baseline" / "summary.json").read_text())
    assert failed["status"] == "failed" and "train.seq_len=65 is longer than the model's context" in failed["error"]
    again = run_py(*args)
    assert again.returncode == 2
    assert f"{sweep} already holds a run (status: ok); nothing was overwritten" in again.stderr
    assert "train.resume" not in again.stdout + again.stderr


# ---- progress on long silent work -----------------------------------------------------------------

class Terminal(io.StringIO):
    """A stderr that says it is a terminal, as a user's is: tqdm draws its bar only there."""

    def isatty(self):
        return True


def tiny_evaluation(ranks, batches=3):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny"))
    tokens = np.random.default_rng(0).integers(0, 50257, 2000).astype(np.uint16)  # as the data split holds them
    return training_run.evaluate(model, tokens, 2, 32, batches, lambda: torch.autocast("cpu", enabled=False), ranks,
                                 torch.device("cpu"))


@pytest.mark.parametrize("stderr, ranks, delay, bar", [
    (Terminal, Ranks(), 0.0, True),  # work past the delay, rank 0, a terminal: a bar that says what it does
    (Terminal, Ranks(), 60.0, False),  # done within the delay (tiny runs): nothing
    (io.StringIO, Ranks(), 0.0, False),  # a pipe or a log file: nothing, the log stays one line per event
    (Terminal, Ranks(rank=1, local_rank=1, world_size=2), 0.0, False),  # only rank 0 draws
])
def test_validation_shows_progress_only_where_it_helps(monkeypatch, stderr, ranks, delay, bar):
    monkeypatch.setattr(training_run, "PROGRESS_DELAY_S", delay)
    monkeypatch.setattr(sys, "stderr", stderr())
    assert tiny_evaluation(ranks, batches=6) > 0
    drawn = sys.stderr.getvalue()
    assert ("validating 6 batches:" in drawn and "0/6 [" in drawn) if bar else drawn == ""


def test_the_first_step_says_it_compiles_and_shows_its_micro_steps(tmp_path, shakespeare_path, monkeypatch, caplog):
    monkeypatch.setattr(training_run, "PROGRESS_DELAY_S", 0.0)
    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)  # the message, not a real compile
    caplog.set_level(logging.INFO, logger="gpt2")
    s, _ = run_train(tmp_path, shakespeare_path, "train.steps=3", "train.batch_size=2", "train.seq_len=32",
                     "train.total_batch_size=192", "train.compile=true")
    assert s["status"] == "ok" and s["grad_accum_steps"] == 3
    said = [r.getMessage() for r in caplog.records]
    assert said.count("compiling the model (the first step takes longer)") == 1
    drawn = sys.stderr.getvalue()
    assert drawn.count("first step (compiling):   0%") == 1 and "0/3 [" in drawn  # one bar: the first step's


# ---- torchrun: the command as typed, and CPU threads per rank ---------------------------------------

@pytest.mark.parametrize("argv, command", [
    (["/usr/bin/python3", "/venv/bin/torchrun", "--standalone", "--nproc_per_node=2", "run.py", "+stage=flash"],
     ["torchrun", "--standalone", "--nproc_per_node=2", "run.py", "+stage=flash"]),
    (["python", "-u", "-m", "torch.distributed.run", "--nnodes=2", "--rdzv-endpoint=h:29500", "run.py"],
     ["torchrun", "--nnodes=2", "--rdzv-endpoint=h:29500", "run.py"]),
    (["srun", "my-launcher", "run.py"], None),  # not torchrun: the caller rebuilds the command from the ranks
])
def test_torchrun_command_is_read_as_typed(monkeypatch, argv, command):
    monkeypatch.setattr(distributed, "_torchrun_process", lambda: (argv, set()))
    assert distributed.torchrun_command() == command


def test_no_torchrun_no_torchrun_command(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert distributed._torchrun_process() is None and distributed.torchrun_command() is None


@pytest.mark.parametrize("launch_env, threads", [
    (set(), 4),  # torchrun set OMP_NUM_THREADS=1 on its own: 8 cores shared by 2 ranks
    ({"OMP_NUM_THREADS"}, None),  # the user chose: keep it
])
def test_cpu_threads_per_rank(monkeypatch, launch_env, threads):
    monkeypatch.setattr(distributed, "_torchrun_process", lambda: (["torchrun"], launch_env))
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.cpu_threads_per_rank() == threads


def test_a_cpu_rank_uses_its_share_of_the_cores(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(distributed, "cpu_threads_per_rank", lambda: before + 1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # no process group needed here
    try:
        distributed.init_process_group(Ranks(world_size=2), "gloo", torch.device("cpu"))
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)
