"""Data-parallel training with torchrun on the CPU (gloo): the same losses as one process, one run folder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

TINY = ["+stage=gpt3-optim", "model=tiny", "train.device=cpu", "train.batch_size=2", "train.seq_len=32",
        "train.timing_skip=1", "train.val_batches=2"]


def no_traceback_of_ours(out: str) -> bool:
    """torchrun prints its own traceback when a worker exits non-zero; ours must print none."""
    return f'File "{REPO / "gpt2"}' not in out and f'File "{REPO / "run.py"}' not in out


def launch(nproc, args, cwd, wait=True):
    """`torchrun --standalone --nproc_per_node=nproc run.py args` (or plain python for one process) in cwd."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = [*prefix, str(REPO / "run.py"), *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def run_folders(cwd: Path):
    return sorted(p.parent for p in (cwd / "outputs").glob("*/*/summary.json"))


def losses(run_dir: Path):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r], [r["val_loss"] for r in lines if "val_loss" in r]


def test_two_processes_equal_one_with_accumulation(tmp_path, shakespeare_path):
    data = [f"data.path={shakespeare_path}", f"data.cache_dir={tmp_path / 'cache'}"]
    # 256 tokens per step: two ranks x two micro-steps of 2x32, or one process x four micro-steps
    args = [*TINY, *data, "train.steps=4", "train.total_batch_size=256"]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    single = launch(1, args, tmp_path / "one")
    double = launch(2, args, tmp_path / "two")
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]
    assert double.returncode == 0, double.stdout[-2000:] + double.stderr[-2000:]

    [one], folders = run_folders(tmp_path / "one"), run_folders(tmp_path / "two")
    assert len(folders) == 1, f"ranks made {len(folders)} run folders"  # every rank, one folder
    [two] = folders
    assert not (two / ".hydra" / "config.yaml").read_text() == ""  # rank 0 wrote Hydra's files
    loss_1, val_1 = losses(one)
    loss_2, val_2 = losses(two)
    assert len(loss_1) == len(loss_2) == 4
    assert loss_2 == pytest.approx(loss_1, rel=1e-5, abs=1e-6)
    assert val_2 == pytest.approx(val_1, rel=1e-5, abs=1e-6)

    s1 = json.loads((one / "summary.json").read_text())
    s2 = json.loads((two / "summary.json").read_text())
    assert s2["world_size"] == 2 and s2["effective"]["world_size"] == 2 and s1["world_size"] == 1
    # gradients as views of DDP's buckets (no second copy), no buffer broadcast before every forward
    assert s2["effective"]["ddp"] == {"gradient_as_bucket_view": True, "broadcast_buffers": False}
    assert s1["effective"]["ddp"] is None
    assert s1["grad_accum_steps"] == 4 and s2["grad_accum_steps"] == 2
    assert s2["tokens_per_step"] == s1["tokens_per_step"] == 256  # tok/s counts every rank
    assert s2["command"].startswith("torchrun --nproc_per_node=2")
    # only rank 0 prints the step lines
    assert double.stdout.count("step     0 |") == 1


def test_world_size_must_divide_the_batch(tmp_path, shakespeare_path):
    result = launch(2, [*TINY, f"data.path={shakespeare_path}", f"data.cache_dir={tmp_path / 'cache'}",
                        "train.steps=1", "train.total_batch_size=192"], tmp_path)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "train.total_batch_size=192 is not divisible by B*T*world = 2*32*2 = 128" in out
    assert no_traceback_of_ours(out)


def test_nccl_needs_cuda(tmp_path, shakespeare_path):
    result = launch(2, [*TINY, f"data.path={shakespeare_path}", f"data.cache_dir={tmp_path / 'cache'}",
                        "train.steps=1", "train.ddp_backend=nccl"], tmp_path)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "train.ddp_backend=nccl needs CUDA" in out and no_traceback_of_ours(out)


def _rank_pid(rank: int, marker: str):
    """The pid of the worker with RANK=rank whose command line mentions marker (a unique path)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmdline and "run.py" in cmdline and f"RANK={rank}".encode() in environ \
                and b"TORCHELASTIC_RUN_ID" in b" ".join(environ):
            return int(proc.name)
    return None


def test_a_dead_rank_stops_the_run(tmp_path, shakespeare_path):
    marker = str(tmp_path / "cache")
    proc = launch(2, [*TINY, f"data.path={shakespeare_path}", f"data.cache_dir={marker}", "train.steps=100000",
                      "optim.warmup_steps=1"], tmp_path, wait=False)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            folders = run_folders(tmp_path)
            if folders and (folders[0] / "metrics.jsonl").is_file() \
                    and len((folders[0] / "metrics.jsonl").read_text().splitlines()) >= 2:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the run did not start")
        pid = _rank_pid(1, marker)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    [folder] = run_folders(tmp_path)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] != "ok"  # never left looking like a finished run
    assert summary["steps"] < 100000
