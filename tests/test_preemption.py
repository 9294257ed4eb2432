"""Preemption and requeue (issue 14): with a fixed run folder and train.resume=auto the same command continues
the folder's run, so that SLURM can requeue it and torchrun restart it with no one there; SIGUSR1 (SLURM's
warning before a time limit) saves after the current step and stops.

A run is stopped at a chosen step by a small wrapper around run.py that sends its own process a signal
(SIGKILL: no chance to save; SIGUSR1 as SLURM sends it), so that the kill lands between two checkpoints
every time, however fast the machine.
"""

import json
import signal

import pytest
import torch

from gpt2.training.checkpoint import CHECKPOINT_NAME, forget_steps_from
from helpers import REPO, TINY_DDP, digest, launch, output_of, records, run_py, strict_json

# cosine schedule after a 2-step warm-up, AdamW moments, clipping: a restart at the wrong step would show
AUTO = [*TINY_DDP, "train.steps=7", "optim.warmup_steps=2", "train.val_every=3", "train.checkpoint_every=2",
        "train.resume=auto"]
STEP_KEYS = ("step", "loss", "lr", "grad_norm")

STOP_AT_STEP = f"""
import os, runpy, signal, sys
sys.path.insert(0, {str(REPO)!r})
from gpt2.training import loop as train

at, signum, rank = int(os.environ["STOP_AT_STEP"]), int(os.environ["STOP_SIGNAL"]), os.environ["STOP_RANK"]
original = train.train_step


def train_step(run, step):
    record = original(run, step)
    # the first attempt only: a requeued or restarted one runs to the end
    if step == at and os.environ.get("RANK", "0") == rank and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        # to this process, or to its torchrun agent (as SLURM signals every process of the job step)
        os.kill(os.getppid() if os.environ.get("STOP_PARENT") else os.getpid(), signum)
    return record


train.train_step = train_step
sys.argv[0] = {str(REPO / "run.py")!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def stop_at_step(tmp_path, step: int, signum: int, rank: int = 0, to_parent: bool = False):
    """The wrapper script, and the environment that makes it send `signum` after step `step` on `rank` (to
    itself, or to its parent: torchrun's agent)."""
    script = tmp_path / "stop_at_step.py"
    script.write_text(STOP_AT_STEP)
    return script, {"STOP_AT_STEP": str(step), "STOP_SIGNAL": str(int(signum)), "STOP_RANK": str(rank),
                    **({"STOP_PARENT": "1"} if to_parent else {})}


@pytest.fixture(scope="module")
def data_args(shakespeare_path, tmp_path_factory):
    return [f"data.path={shakespeare_path}", f"data.cache_dir={tmp_path_factory.mktemp('cache')}"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_args):
    """The run nothing stops, with train.resume=auto into an empty folder (as a job script's mkdir -p leaves
    it): a fresh start."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run_py(*AUTO, *data_args, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, output_of(result)[-3000:]
    summary = strict_json(run_dir / "summary.json")
    assert summary["status"] == "ok" and summary["start_step"] == 0 and summary["resumed_from"] is None
    return run_dir


def assert_same_run(run_dir, full_dir):
    """Every step's loss, lr and norm, every validation and the final weights equal the uninterrupted run's."""
    steps, full_steps = records(run_dir), records(full_dir)
    assert [r["step"] for r in steps] == list(range(7))  # each step once: none lost, none logged twice
    assert [{k: r[k] for k in STEP_KEYS} for r in steps] == [{k: r[k] for k in STEP_KEYS} for r in full_steps]
    assert records(run_dir, "val_loss") == records(full_dir, "val_loss")
    final, final_full = (torch.load(d / CHECKPOINT_NAME, weights_only=True) for d in (run_dir, full_dir))
    assert final["step"] == final_full["step"] == 7
    for key, tensor in final_full["model"].items():
        assert torch.equal(final["model"][key], tensor), key


# SIGKILL in step 5: killed between the checkpoints after 4 and 6 steps, with step 4 logged after the first of
# them; in step 1: killed before any checkpoint, with step 0 logged, so the same command starts over; SIGUSR1
# in step 4: that step finished and saved (5 done), the exit a requeue expects (1, "interrupted"); SIGUSR2 (what
# submitit's SLURM jobs get before their time limit) alike
@pytest.mark.parametrize("signum, at, continues_from", [(signal.SIGKILL, 5, 4), (signal.SIGKILL, 1, 0),
                                                        (signal.SIGUSR1, 4, 5), (signal.SIGUSR2, 3, 4)],
                         ids=["SIGKILL-between-checkpoints", "SIGKILL-before-any-checkpoint", "SIGUSR1", "SIGUSR2"])
@pytest.mark.slow
def test_the_same_command_continues_a_stopped_run_as_if_never_stopped(tmp_path, data_args, uninterrupted, signum,
                                                                        at, continues_from):
    run_dir = tmp_path / "run"
    command = [*AUTO, *data_args, f"hydra.run.dir={run_dir}"]
    script, env = stop_at_step(tmp_path, at, signum)
    first = launch(1, command, tmp_path, script=script, env=env)
    if signum == signal.SIGKILL:
        assert first.returncode == -signal.SIGKILL
        assert strict_json(run_dir / "summary.json")["status"] == "running"  # never ended: no chance to say so
    else:
        assert first.returncode == 1 and "Traceback" not in first.stdout
        assert f"{signal.Signals(signum).name}: stopping after this step" in first.stdout
        summary = strict_json(run_dir / "summary.json")
        assert summary["status"] == "interrupted" and summary["steps"] == at + 1
        assert summary["error"].endswith("the same command continues it (train.resume=auto)")
    assert [r["step"] for r in records(run_dir)] == list(range(at + (signum != signal.SIGKILL)))
    if continues_from:
        assert torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)["step"] == continues_from
    else:
        assert not (run_dir / CHECKPOINT_NAME).exists()

    again = run_py(*command)  # as SLURM requeues it, or torchrun restarts it
    assert again.returncode == 0, output_of(again)[-3000:]
    summary = strict_json(run_dir / "summary.json")
    assert summary["status"] == "ok" and summary["start_step"] == continues_from
    assert summary["resumed_from"] == (str(run_dir / CHECKPOINT_NAME) if continues_from else None)
    assert_same_run(run_dir, uninterrupted)


def test_the_rows_logged_after_the_checkpoint_go_and_so_does_a_row_cut_short(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    kept = '{"step": 0, "loss": 10.8}\n{"step": 1, "loss": 10.7}\n{"step": 1, "val_loss": 10.75}\n'
    metrics.write_text(kept + '{"step": 2, "loss": 10.6}\n{"step": 3, "lo')  # killed while writing step 3
    forget_steps_from(metrics, 2)  # the checkpoint holds 2 steps: the run goes on with step 2
    assert metrics.read_text() == kept


@pytest.mark.slow
def test_a_finished_run_is_left_as_it_is(uninterrupted, data_args):
    # a requeued job that had already finished: nothing trained again, nothing rewritten, exit 0
    files = sorted(p for p in uninterrupted.rglob("*") if p.is_file())
    before = {p: digest(p) for p in files}
    result = run_py(*AUTO, *data_args, f"hydra.run.dir={uninterrupted}")
    assert result.returncode == 0, output_of(result)[-3000:]
    assert output_of(result).strip().splitlines() == [
        f"{uninterrupted} holds a finished run (status: ok, 7 steps); nothing to do: train.resume=auto continues "
        f"only an unfinished run. To train it further, continue it in another folder: hydra.run.dir=NEW "
        f"train.resume={uninterrupted}"]
    assert sorted(p for p in uninterrupted.rglob("*") if p.is_file()) == files
    assert {p: digest(p) for p in files} == before


REFUSED = {
    # a folder named by the clock is new on every restart: auto would start over every time, silently
    "clock-named-folder": ([], None,
                           "error: train.resume=auto needs a fixed run folder, but hydra.run.dir=outputs/"),
    "diverged-run": (["hydra.run.dir=run"], {"status": "diverged"},
                     "holds a run that diverged: train.resume=auto would only diverge again from its checkpoint"),
    "sweep": (["--multirun", "hydra.sweep.dir=sweep"], None,
              "error: train.resume=auto continues one run in its own folder, not a sweep (hydra.sweep.dir)"),
}


@pytest.mark.parametrize("case", list(REFUSED))
@pytest.mark.slow
def test_auto_refuses_what_it_cannot_continue(tmp_path, data_args, case):
    extra, summary, message = REFUSED[case]
    if summary:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    before = sorted(tmp_path.rglob("*"))
    flags = [a for a in extra if a.startswith("--")]  # Hydra's own flags come before the overrides
    result = run_py(*flags, *TINY_DDP, *data_args, "train.steps=1", "train.resume=auto",
                    *(a for a in extra if a not in flags), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in output_of(result)
    [line] = output_of(result).strip().splitlines()
    assert message in line
    assert sorted(tmp_path.rglob("*")) == before  # refused before anything was written


# ---- under torchrun ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, data_args):
    """The command for two ranks, and the folder of its run that nothing stopped (a folder that did not exist:
    train.resume=auto starts the run)."""
    command = [*TINY_DDP, *data_args, "train.steps=6", "optim.warmup_steps=1", "train.checkpoint_every=2",
               "train.resume=auto"]
    full_dir = tmp_path_factory.mktemp("two_ranks") / "full"
    full = launch(2, [*command, f"hydra.run.dir={full_dir}"], full_dir.parent)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    assert strict_json(full_dir / "summary.json")["start_step"] == 0
    return command, full_dir


def assert_same_losses(run_dir, full_dir):
    steps, full_steps = records(run_dir), records(full_dir)
    assert [r["step"] for r in steps] == list(range(6))
    # bit for bit: the same command on the same thread count computes the same numbers (gloo sums two ranks)
    assert [{k: r[k] for k in STEP_KEYS} for r in steps] == [{k: r[k] for k in STEP_KEYS} for r in full_steps]


@pytest.mark.slow
def test_sigusr1_to_torchrun_stops_every_rank_after_one_step_and_the_same_command_continues(tmp_path, two_ranks):
    # SLURM signals torchrun's agent; with SIGUSR1 among --signals-to-handle it passes the signal on to its
    # ranks, which agree on the step to stop after, save it, and exit; then the job is requeued
    command, full_dir = two_ranks
    run_dir = tmp_path / "run"
    script, env = stop_at_step(tmp_path, 1, signal.SIGUSR1, rank=1, to_parent=True)
    handled = "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    first = launch(2, [*command, f"hydra.run.dir={run_dir}"], tmp_path, script=script, env=env,
                   torchrun=["--standalone", handled])
    out = first.stdout + first.stderr
    assert first.returncode != 0 and "SIGUSR1: stopping after this step" in out
    summary = strict_json(run_dir / "summary.json")
    # "interrupted", not "failed": every rank took part in the last step's vote, so they stopped together
    assert summary["status"] == "interrupted" and 2 <= summary["steps"] < 6, out[-3000:]
    assert torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)["step"] == summary["steps"]

    again = launch(2, [*command, f"hydra.run.dir={run_dir}"], tmp_path, torchrun=["--standalone", handled])
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert strict_json(run_dir / "summary.json")["start_step"] == summary["steps"]
    assert_same_losses(run_dir, full_dir)


@pytest.mark.slow
def test_torchrun_restarts_a_killed_rank_and_the_run_finishes(tmp_path, two_ranks):
    # rank 1 is killed in step 2, after the checkpoint of step 2; torchrun --max-restarts=1 starts both ranks
    # again with the same command, and train.resume=auto continues from that checkpoint
    command, full_dir = two_ranks
    run_dir = tmp_path / "run"
    script, env = stop_at_step(tmp_path, 2, signal.SIGKILL, rank=1)
    # the restarted ranks must not meet in the store torchrun's agent keeps across restarts: they would read
    # the killed ranks' addresses from it and fail or hang (pytorch/pytorch#135712); a store per attempt
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    result = launch(2, [*command, f"hydra.run.dir={run_dir}"], tmp_path, script=script, env=env,
                    torchrun=["--standalone", "--max-restarts=1"])
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "failed (exitcode: -9) local_rank: 1" in out  # torchrun saw rank 1 killed, and restarted the ranks
    assert f"resumed from {run_dir / CHECKPOINT_NAME} at step 2" in out
    summary = strict_json(run_dir / "summary.json")
    assert summary["status"] == "ok" and summary["steps"] == 6 and summary["start_step"] == 2
    assert_same_losses(run_dir, full_dir)
