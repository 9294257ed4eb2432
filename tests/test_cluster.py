"""Sweeps through Hydra's submitit launcher plugin (pip install -e ".[cluster]"), on this machine with
hydra/launcher=local_cpu (submitit's local executor: each job a subprocess, all at once, no GPU), and the
report's rule for runs whose timings overlapped on one host and device."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from gpt2.reporting import rules
from gpt2.training.checkpoint import CHECKPOINT_NAME
from gpt2.reporting.build import build_report
from helpers import REPO, TINY_CLUSTER, data_args, run_py, summaries

pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                    reason="hydra-submitit-launcher is not installed: pip install -e '.[cluster]'")


@pytest.mark.slow
def test_local_launcher_sweep_writes_every_job_and_one_report(tmp_path, shakespeare_path):
    result = run_py("-m", "+stage=baseline,flash", "hydra/launcher=local_cpu", *TINY_CLUSTER,
                    *data_args(tmp_path, shakespeare_path), f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = summaries(tmp_path / "sweep")
    assert list(runs) == ["0_baseline", "1_flash"]
    assert all(s["status"] == "ok" and s["steps"] == 2 and s["exit_code"] == 0 and s["host"] for s in runs.values())
    table = pd.read_csv(tmp_path / "sweep" / "report.csv", keep_default_na=False)
    assert list(table["stage"]) == ["baseline", "flash"] and list(table["status"]) == ["ok", "ok"]
    # submitit_local starts both jobs at once; whether these 2-step runs overlapped depends on the machine, and
    # the report must say exactly that either way (the Ctrl-C test below forces the overlap)
    (a, b) = ((s["started_at"], s["finished_at"]) for s in runs.values())
    overlapped = a[0] < b[1] and b[0] < a[1]
    assert list(table["overlapped_with"]) == (["flash", "baseline"] if overlapped else ["", ""])
    assert ("timing not comparable" in (tmp_path / "sweep" / "report.md").read_text()) == overlapped
    # a used sweep folder is refused, as with the basic launcher
    again = run_py("-m", "+stage=baseline", "hydra/launcher=local_cpu", *TINY_CLUSTER,
                   *data_args(tmp_path, shakespeare_path), f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=120)
    assert again.returncode == 2 and "already holds a run" in again.stderr


@pytest.mark.slow
def test_failed_job_under_a_launcher_plugin_fails_the_sweep(tmp_path, shakespeare_path):
    # the jobs run in other processes: the submitting one learns of the failure from tf32's summary.json
    result = run_py("-m", "+stage=baseline,tf32", "hydra/launcher=local_cpu", *TINY_CLUSTER,
                    *data_args(tmp_path, shakespeare_path),
                    "+sweep.stage_overrides.tf32=['train.total_batch_size=1000']",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=300)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]  # bad input alone: 2
    runs = summaries(tmp_path / "sweep")
    assert runs["0_baseline"]["status"] == "ok"
    assert runs["1_tf32"]["status"] == "failed" and runs["1_tf32"]["exit_code"] == 2
    table = pd.read_csv(tmp_path / "sweep" / "report.csv")
    assert list(table["status"]) == ["ok", "failed"]
    # the job ran in submitit's process, not `python run.py`: its command is the sweep's, with its own values
    typed = ["hydra/launcher=local_cpu", f"hydra.sweep.dir={tmp_path / 'sweep'}", "+stage=tf32", *TINY_CLUSTER]
    assert runs["1_tf32"]["command"].startswith("python run.py -m ") and "_submit" not in runs["1_tf32"]["command"]
    assert set(typed) <= set(shlex.split(runs["1_tf32"]["command"]))
    assert "+stage=baseline" not in runs["1_tf32"]["command"]
    assert f"- tf32: `{runs['1_tf32']['command']}`" in (tmp_path / "sweep" / "report.md").read_text()


def _processes_of(sweep_dir):
    """The pids whose command line names the sweep folder: submitit's local job controllers and their jobs."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(sweep_dir).encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:  # ended meanwhile
            pass
    return found


@pytest.mark.slow
def test_ctrl_c_on_the_submitting_side_cancels_the_jobs(tmp_path, shakespeare_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "+stage=baseline,flash", "hydra/launcher=local_cpu", *TINY_CLUSTER, "train.steps=1000000",
            *data_args(tmp_path, shakespeare_path), f"hydra.sweep.dir={sweep}"]
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 180
        while not _both_training(sweep) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _both_training(sweep), (tmp_path / "err").read_text()[-3000:]
        # both jobs are in their training loops now; cancelled 1.5 s later, their runs overlap by more than the
        # whole seconds of started_at / finished_at can hide
        time.sleep(1.5)
        os.kill(proc.pid, signal.SIGINT)  # the submitting process alone, as a scheduler's jobs would not get it
        assert proc.wait(timeout=120) == 1
    finally:
        proc.kill()
        for pid in _processes_of(sweep):
            os.kill(pid, signal.SIGKILL)
    assert _processes_of(sweep) == []
    assert "interrupted: cancelled the 2 job(s) this sweep submitted" in (tmp_path / "err").read_text()
    # the cancelled jobs stopped like on a Ctrl-C of their own: the step they were in finished and saved
    for name, summary in summaries(sweep).items():
        assert summary["status"] == "interrupted" and summary["steps"] >= 1, (name, summary["status"])
        checkpoint = torch.load(sweep / name / CHECKPOINT_NAME, weights_only=True)
        assert checkpoint["step"] == summary["steps"], name
    # the report was written once, with them, and says they ran alongside each other
    table = pd.read_csv(sweep / "report.csv", keep_default_na=False)
    assert list(table["stage"]) == ["baseline", "flash"] and list(table["status"]) == ["interrupted"] * 2
    assert list(table["overlapped_with"]) == ["flash", "baseline"]
    assert "timing not comparable: ran alongside" in (sweep / "report.md").read_text()


def _both_training(sweep) -> bool:
    """Both jobs logged a step: past start-up, in the loop that a signal stops after its step, with a checkpoint."""
    return all(sweep.joinpath(name, "metrics.jsonl").is_file() and sweep.joinpath(name, "metrics.jsonl").read_text()
               for name in ("0_baseline", "1_flash"))


@pytest.mark.slow
def test_a_job_killed_hard_still_gets_the_sweeps_report(tmp_path, shakespeare_path):
    # SIGKILL (out of memory, a lost node): no summary.json at the end and no result for submitit; the plugin
    # alone would abort the sweep there, report and all
    sweep = tmp_path / "sweep"
    args = ["-m", "+stage=baseline,flash", "hydra/launcher=local_cpu", *TINY_CLUSTER, "train.steps=3",
            "+sweep.stage_overrides.flash=['train.steps=1000000']", *data_args(tmp_path, shakespeare_path),
            f"hydra.sweep.dir={sweep}"]
    with open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=err)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (not sweep.is_dir() or
                                               summaries(sweep).get("0_baseline", {}).get("status") != "ok"):
            time.sleep(0.2)  # baseline done; flash runs on
        assert summaries(sweep)["1_flash"]["status"] == "running", (tmp_path / "err").read_text()[-3000:]
        for pid in _processes_of(sweep):
            if pid != proc.pid:
                os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
    finally:
        proc.kill()
        for pid in _processes_of(sweep):
            os.kill(pid, signal.SIGKILL)
    assert "a job of this sweep ended without a result" in (tmp_path / "err").read_text()
    table = pd.read_csv(sweep / "report.csv")
    assert list(table["stage"]) == ["baseline", "flash"] and list(table["status"]) == ["ok", "incomplete"]


def test_a_job_killed_without_a_summary_counts_as_failed(tmp_path):
    from gpt2.runs import job
    sweep = tmp_path / "sweep"
    (sweep / "0_baseline").mkdir(parents=True)
    (sweep / "0_baseline" / "summary.json").write_text(json.dumps({"stage": "baseline", "status": "ok"}))
    (sweep / "1_flash").mkdir()
    (sweep / "1_flash" / "summary.json").write_text(json.dumps({"stage": "flash", "status": "running"}))
    (sweep / ".submitit").mkdir()
    before = list(job._failures)
    try:
        job._failures.clear()
        job.count_failures_in(sweep)
        job.count_failures_in(sweep)  # counted once
        assert job._failures == [("flash", "incomplete", 1)] and job.exit_code() == 1
    finally:
        job._failures[:] = before
        job._failed_dirs.discard((sweep / "1_flash").resolve())


def _summary(stage, start, end, host="node1", device="NVIDIA H100 80GB HBM3", gpus=None, status="ok"):
    return {"stage": stage, "status": status, "device": device, "device_type": "cuda", "model": "gpt2",
            "seq_len": 1024, "world_size": 1, "batch_size": 16, "steps": 10, "steps_measured": 5,
            "tokens_per_step": 16384, "ms_per_step": 100.0, "tokens_per_sec": 163840.0, "host": host, "gpus": gpus,
            "started_at": f"2026-01-01T10:{start:02d}:00+00:00", "finished_at": f"2026-01-01T10:{end:02d}:00+00:00"}


@pytest.mark.parametrize("b, overlapping", [
    (dict(start=5, end=15), True),                     # same host and device, at the same time
    (dict(start=10, end=20), False),                   # started as the other finished
    (dict(start=5, end=15, host="node2"), False),      # another machine
    (dict(start=5, end=15, gpus="1"), False),          # the scheduler gave each its own GPU
    (dict(start=5, end=15, gpus="0"), True),           # ... or the same one
    (dict(start=5, end=15, device="cpu"), False),      # another device
    (dict(start=5, end=15, host=None), False),         # an old summary without a host: cannot tell
])
def test_overlap_rule(b, overlapping):
    a = ("node1", "NVIDIA H100 80GB HBM3", "0", "2026-01-01T10:00:00+00:00", "2026-01-01T10:10:00+00:00")
    b = {**dict(host="node1", device="NVIDIA H100 80GB HBM3", gpus="0"), **b}
    fb = (b["host"], b["device"], b["gpus"], f"2026-01-01T10:{b['start']:02d}:00+00:00",
          f"2026-01-01T10:{b['end']:02d}:00+00:00")
    assert rules.overlaps([a, fb]) == ([[1], [0]] if overlapping else [[], []])


def test_report_marks_overlapping_rows(tmp_path):
    for i, s in enumerate([_summary("baseline", 0, 10), _summary("flash", 5, 15), _summary("compile", 20, 30),
                           _summary("bf16", 5, 6, status="failed")]):
        (tmp_path / f"{i}_{s['stage']}").mkdir()
        (tmp_path / f"{i}_{s['stage']}" / "summary.json").write_text(json.dumps(s))
    paths = build_report([tmp_path])
    table = pd.read_csv(paths["csv"], keep_default_na=False)
    assert list(table["overlapped_with"]) == ["flash; bf16", "baseline; bf16", "", ""]
    md = paths["md"].read_text()
    assert "- **overlap:** 2 timed row(s) (baseline, flash)" in md
    assert "| flash; bf16 |" in md and "| baseline; bf16 |" in md and "timing not comparable: ran alongside" in md
    # runs made one at a time: no column, no note
    clean = tmp_path / "clean"
    for i, s in enumerate([_summary("baseline", 0, 10), _summary("flash", 10, 20)]):
        (clean / f"{i}_{s['stage']}").mkdir(parents=True)
        (clean / f"{i}_{s['stage']}" / "summary.json").write_text(json.dumps(s))
    md = build_report([clean])["md"].read_text()
    assert "overlap" not in md and "ran alongside" not in md
