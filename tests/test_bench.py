"""`python -m gpt2.bench --smoke`: the one-call GPU benchmark, CPU-sized, end to end, so the command never rots."""

import json
import subprocess
import sys

import pytest

from conftest import REPO
from test_config import STAGES


def bench(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "gpt2.bench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, shakespeare_path):
    out = tmp_path_factory.mktemp("bench") / "out"
    return bench("--smoke", "--out", str(out), "--data", str(shakespeare_path), "--budget-s", "600"), out


def test_smoke_runs_every_phase(smoke):
    result, out = smoke
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    phases = {p["phase"]: p for p in json.loads((out / "bench.json").read_text())["phases"]}
    assert [p for p in phases] == ["env", "tests", "sweep", "scan"]
    assert all(p["status"] == "ok" for p in phases.values()), phases
    assert "skipped" in phases["tests"]["detail"]  # no CUDA here: the cuda suite skips, with its reasons in tests.log
    assert "no CUDA" in (out / "tests.log").read_text()
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] and env["gpu"] is None and "python_headers" in env


def test_smoke_sweep_has_every_stage_and_a_report(smoke):
    _, out = smoke
    runs = json.loads((out / "bench.json").read_text())["sweep"]
    assert [r["stage"] for r in runs] == STAGES
    assert all(r["status"] == "ok" and r["steps"] == 2 for r in runs), [(r["stage"], r["error"]) for r in runs]
    assert all(r["config"]["train"]["save_checkpoints"] is False for r in runs)
    assert not list(out.rglob("checkpoint.pt"))  # a benchmark never writes checkpoints
    assert (out / "sweep" / "report.md").is_file() and (out / "sweep" / "report.png").is_file()


def test_smoke_packs_everything_into_one_archive(smoke):
    import tarfile

    _, out = smoke
    with tarfile.open(out / "bench.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"bench.md", "env.json", "sweep/report.md", "sweep/0_baseline/summary.json",
            "sweep/0_baseline/metrics.jsonl"} <= names


def test_smoke_scan_and_table(smoke):
    _, out = smoke
    scan = json.loads((out / "bench.json").read_text())["scan"]
    assert sorted(r["batch_size"] for r in scan) == [4, 8] and all(r["status"] == "ok" for r in scan)
    table = (out / "bench.md").read_text()
    assert "| phase | status | seconds | detail |" in table and "## Micro-batch scan" in table
    for stage in STAGES:
        assert f"| sweep | {stage} |" in table


def test_bad_arguments_are_one_line_and_touch_nothing(tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "bench.md").write_text("an earlier result")
    result = bench("--smoke", "--out", str(used))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "already holds files; nothing was overwritten" in result.stderr
    assert (used / "bench.md").read_text() == "an earlier result"
    result = bench("--smoke", "--out", str(tmp_path / "new"), "--data", str(tmp_path / "missing.txt"))
    assert result.returncode == 2 and "no such file" in result.stderr and not (tmp_path / "new").exists()
