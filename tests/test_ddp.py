"""Data-parallel training with torchrun on the CPU (gloo): the same losses as one process, one run folder."""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from helpers import REPO, TINY_DDP, free_port, launch, records

pytestmark = pytest.mark.slow  # every test starts torchrun (or run.py) in a subprocess


def no_traceback_of_ours(out: str) -> bool:
    """torchrun prints its own traceback when a worker exits non-zero; ours must print none."""
    return f'File "{REPO / "gpt2"}' not in out and f'File "{REPO / "run.py"}' not in out


def run_folders(cwd: Path):
    return sorted(p.parent for p in (cwd / "outputs").glob("*/*/summary.json"))


def losses(run_dir: Path):
    return [r["loss"] for r in records(run_dir)], [r["val_loss"] for r in records(run_dir, "val_loss")]


def rendezvous(nnodes: int, **options) -> list:
    """torchrun's flags for `nnodes` agents meeting at a c10d rendezvous on this host, as on a cluster's nodes."""
    return [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
            "--rdzv-id=gpt2-test", *(f"--{k.replace('_', '-')}={v}" for k, v in options.items())]


@pytest.fixture(scope="module")
def accumulation(tmp_path_factory, shakespeare_path):
    """256 tokens per step: two ranks x two micro-steps of 2x32, or one process x four micro-steps. The
    arguments, and the run folder of one process doing it by accumulation."""
    tmp = tmp_path_factory.mktemp("one_process")
    args = [*TINY_DDP, f"data.path={shakespeare_path}", f"data.cache_dir={tmp / 'cache'}", "train.steps=4",
            "train.total_batch_size=256"]
    single = launch(1, args, tmp)
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]
    [one] = run_folders(tmp)
    return args, one


def test_two_processes_equal_one_with_accumulation(tmp_path, accumulation):
    args, one = accumulation
    (tmp_path / "two").mkdir()
    double = launch(2, args, tmp_path / "two")
    assert double.returncode == 0, double.stdout[-2000:] + double.stderr[-2000:]

    folders = run_folders(tmp_path / "two")
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
    # the command as typed, torchrun's own flags included, so that it can be run again
    assert s2["command"] == f"torchrun --standalone --nproc_per_node=2 {REPO / 'run.py'} {' '.join(args)}"
    # only rank 0 prints the step lines
    assert double.stdout.count("step     0 |") == 1


def test_two_nodes_on_one_host_equal_one_process_with_accumulation(tmp_path, accumulation):
    # multi-node as on a cluster, on one machine: two torchrun agents of one process each, one c10d rendezvous
    args, one = accumulation
    flags = rendezvous(2, rdzv_conf="join_timeout=60")
    agents = [launch(1, args, tmp_path, wait=False, torchrun=flags) for _ in range(2)]
    try:
        outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(out[-2000:] for out in outputs)

    folders = run_folders(tmp_path)
    assert len(folders) == 1, f"the nodes made {len(folders)} run folders"
    [two] = folders
    assert len(list((tmp_path / "outputs").glob("*/*"))) == 1  # not even an empty folder of another rank's
    loss_1, val_1 = losses(one)
    loss_2, val_2 = losses(two)
    assert loss_2 == pytest.approx(loss_1, rel=1e-5, abs=1e-6) and len(loss_2) == 4
    assert val_2 == pytest.approx(val_1, rel=1e-5, abs=1e-6)
    # only global rank 0 writes: the same files as the single process's, each step logged once
    files = {str(p.relative_to(one)) for p in one.rglob("*") if p.is_file()}
    assert {str(p.relative_to(two)) for p in two.rglob("*") if p.is_file()} == files
    assert sum(out.count("step     0 |") for out in outputs) == 1
    assert (two / "run.log").read_text().count("step     0 |") == 1
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["grad_accum_steps"] == 2 and summary["status"] == "ok"
    # the command to start each node with, rendezvous included
    assert summary["command"].startswith(f"torchrun {' '.join(flags)} --nproc_per_node=1 ")


def test_world_size_must_divide_the_batch(tmp_path, shakespeare_path):
    result = launch(2, [*TINY_DDP, f"data.path={shakespeare_path}", f"data.cache_dir={tmp_path / 'cache'}",
                        "train.steps=1", "train.total_batch_size=192"], tmp_path)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "train.total_batch_size=192 is not divisible by B*T*world = 2*32*2 = 128" in out
    assert no_traceback_of_ours(out)


def test_nccl_needs_cuda(tmp_path, shakespeare_path):
    result = launch(2, [*TINY_DDP, f"data.path={shakespeare_path}", f"data.cache_dir={tmp_path / 'cache'}",
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
    proc = launch(2, [*TINY_DDP, f"data.path={shakespeare_path}", f"data.cache_dir={marker}", "train.steps=100000",
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
