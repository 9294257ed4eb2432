"""`python -m gpt2.bench --smoke`: the one-call GPU benchmark, CPU-sized, end to end, so the command never rots."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import REPO, STAGES, make_fake_llmc


def bench(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "gpt2.bench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, shakespeare_path):
    out = tmp_path_factory.mktemp("bench") / "out"
    llmc = make_fake_llmc(tmp_path_factory.mktemp("llm.c"))  # a stand-in train_gpt2cu (tests/helpers.py)
    return bench("--smoke", "--out", str(out), "--data", str(shakespeare_path), "--budget-s", "600",
                 "--llmc", str(llmc)), out


@pytest.mark.slow
def test_smoke_runs_every_phase(smoke):
    result, out = smoke
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    phases = {p["phase"]: p for p in json.loads((out / "bench.json").read_text())["phases"]}
    assert [p for p in phases] == ["env", "tests", "sweep", "candidates", "peers", "scan"]
    assert all(p["status"] == "ok" for p in phases.values()), phases
    assert "skipped" in phases["tests"]["detail"]  # no CUDA here: the cuda suite skips, with its reasons in tests.log
    assert "no CUDA" in (out / "tests.log").read_text()
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["gpu"] is None and isinstance(env["python_headers"], bool)


@pytest.mark.slow
def test_smoke_sweep_has_every_stage_and_a_report(smoke):
    _, out = smoke
    runs = json.loads((out / "bench.json").read_text())["sweep"]
    assert [r["stage"] for r in runs] == STAGES
    assert all(r["status"] == "ok" and r["steps"] == 2 for r in runs), [(r["stage"], r["error"]) for r in runs]
    assert all(r["config"]["train"]["save_checkpoints"] is False for r in runs)
    assert not list(out.rglob("checkpoint.pt"))  # a benchmark never writes checkpoints
    assert (out / "sweep" / "report.md").is_file() and (out / "sweep" / "report.png").is_file()


@pytest.mark.slow
def test_smoke_packs_everything_into_one_archive(smoke):
    import tarfile

    _, out = smoke
    with tarfile.open(out / "bench.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"bench.md", "env.json", "sweep/report.md", "sweep/0_baseline/summary.json",
            "sweep/0_baseline/metrics.jsonl"} <= names


@pytest.mark.slow
def test_smoke_peers_phase(smoke):
    _, out = smoke
    peers = json.loads((out / "peers.json").read_text())
    assert [(r["peer"], r["status"]) for r in peers["peers"]] == [("llm.c", "ok"), ("transformers", "ok")], peers
    assert peers["ours"]["tokens_per_sec"] == max(r["tokens_per_sec"] for r in json.loads(
        (out / "bench.json").read_text())["sweep"] if r["status"] == "ok")
    assert "## Peers, same card, same call" in (out / "bench.md").read_text()


@pytest.mark.slow
def test_smoke_candidates_phase(smoke):
    """The stages beyond the sweep run beside big-batch: fp8-head (FP8 emulated on the CPU) ends ok, flash4 is
    refused with its one-line reason, the Inductor option waits for a compiled run; bench.md shows them."""
    _, out = smoke
    rows = {r["name"]: r for r in json.loads((out / "candidates.json").read_text())}
    assert list(rows) == ["flash4", "fp8-head", "big-batch_cdt"]
    assert rows["fp8-head"]["status"] == "ok" and rows["fp8-head"]["tokens_per_sec"] > 0
    assert rows["flash4"]["status"] == "refused" and "NVIDIA GPUs only" in rows["flash4"]["detail"]
    assert rows["big-batch_cdt"] == {"name": "big-batch_cdt", "builds_on": "big-batch", "status": "skipped",
                                     "detail": "--smoke runs without torch.compile"}
    ran = json.loads((out / "bench.json").read_text())["candidates"]
    assert [(r["stage"], r["effective"]["loss"]) for r in ran] == [("fp8-head", "fused_fp8")]
    md = (out / "bench.md").read_text()
    fp8_row = next(ln for ln in md.splitlines() if ln.startswith("| fp8-head | big-batch | ok |"))
    big = next(r for r in json.loads((out / "bench.json").read_text())["sweep"] if r["stage"] == "big-batch")
    assert fp8_row.split(" | ")[5] == f"{rows['fp8-head']['tokens_per_sec'] / big['tokens_per_sec']:.3f}x"


@pytest.mark.slow
def test_smoke_scan_and_table(smoke):
    _, out = smoke
    scan = json.loads((out / "bench.json").read_text())["scan"]
    assert sorted(r["batch_size"] for r in scan) == [4, 8] and all(r["status"] == "ok" for r in scan)
    table = (out / "bench.md").read_text()
    assert "| phase | status | seconds | detail |" in table and "## Micro-batch scan" in table
    for stage in STAGES:
        assert f"| sweep | {stage} |" in table


@pytest.mark.slow
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


@pytest.mark.parametrize("finished", [True, False])
def test_a_sweep_cut_at_its_limit_is_ok_only_when_every_job_and_the_report_were_done(tmp_path, monkeypatch, finished):
    from gpt2.bench import Bench

    bench_ = Bench(tmp_path, budget_s=600, data=None, smoke=True)
    stages = [{"name": name, "compile": False, "total_batch_size": None, "batch_size": 16}
              for name in ("baseline", "tf32")]

    def cut_at_the_limit(phase, cmd, log_name, limit_s):  # the jobs ran; SIGTERM came while the process exited
        for i, stage in enumerate(stages):
            (tmp_path / "sweep" / f"{i}_{stage['name']}").mkdir(parents=True)
            status = "ok" if finished or i == 0 else "interrupted"
            (tmp_path / "sweep" / f"{i}_{stage['name']}" / "summary.json").write_text(json.dumps({"status": status}))
        if finished:
            (tmp_path / "sweep" / "report.md").write_text("# report\n")
        return None, 170.0

    monkeypatch.setattr(bench_, "run", cut_at_the_limit)
    bench_.sweep(stages)
    row = bench_.phases[-1]
    if finished:
        assert row["status"] == "ok" and "still exiting at the phase's time limit" in row["detail"]
    else:
        assert row["status"] == "timed out" and row["detail"].startswith("1 of 2 stages ok")


@pytest.mark.slow
def test_smoke_scan_runs_one_step_a_size(smoke):
    _, out = smoke
    scan = json.loads((out / "bench.json").read_text())["scan"]
    assert [r["steps"] for r in scan] == [1, 1] and all(r["seq_len"] == 8 for r in scan)


@pytest.mark.parametrize("smoke_run, given, threads", [
    (True, None, "1"),  # a smoke run's children: one CPU thread each (two that wait on each other were 2x slower)
    (True, "2", "2"),  # the caller's choice is kept
    (False, None, "unset"),  # a real benchmark leaves torch to choose
])
def test_smoke_runs_use_one_cpu_thread_unless_told(tmp_path, monkeypatch, smoke_run, given, threads):
    from gpt2.bench import Bench

    if given is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", given)
    bench_ = Bench(tmp_path, budget_s=600, data=None, smoke=smoke_run)
    code, _ = bench_.run("env", [sys.executable, "-c", "import os; print(os.environ.get('OMP_NUM_THREADS', 'unset'))"],
                         "threads.log", limit_s=60)
    assert code == 0 and (tmp_path / "threads.log").read_text().strip() == threads


def test_candidates_are_the_stage_files_beyond_the_sweep_then_the_options(tmp_path):
    from gpt2.benchmark.candidates import candidate_runs

    conf = tmp_path / "conf"
    (conf / "stage").mkdir(parents=True)
    for name, parent in (("baseline", None), ("big-batch", "baseline"), ("mine", "big-batch")):
        (conf / "stage" / f"{name}.yaml").write_text("# @package _global_\n" + (
            f"defaults:\n  - {parent}\n  - _self_\n" if parent else ""))
    runs = candidate_runs(conf, ["baseline", "big-batch"])
    assert runs == [{"name": "mine", "builds_on": "big-batch", "stage": "mine", "overrides": []},
                    {"name": "big-batch_cdt", "builds_on": "big-batch", "stage": "big-batch",
                     "overrides": ["+train.compile_options.coordinate_descent_tuning=true"]}]
    assert [r["name"] for r in candidate_runs(conf, ["baseline"])] == ["big-batch", "mine"]  # no big-batch: no option


def test_a_refused_candidate_reads_its_one_line(tmp_path):
    from gpt2.benchmark.candidates import refusal

    log = tmp_path / "x.log"
    log.write_text("[bench] ...\nerror: model.attention=flash4 (stage flash4) needs FlashAttention-4, but x\n")
    assert refusal(log) == "model.attention=flash4 (stage flash4) needs FlashAttention-4, but x"
    log.write_text("Traceback ...\n")
    assert refusal(log) == "refused before the start (see the log)"


class FakeBench:
    """What run_candidates uses of Bench: each run `refused` (exit 2, one error line), as on a card without it."""

    def __init__(self, out, sweep_name="speedup_full"):
        self.out, self.sweep_name, self.smoke, self.phases, self.limits = out, sweep_name, False, [], []

    def record(self, phase, status, seconds=0, detail=""):
        self.phases.append((phase, status, detail))

    def fits(self, phase, needs_s):
        return True

    def left(self):
        return 10_000.0

    def common_overrides(self):
        return []

    def stage_overrides(self, stage):
        return []

    def run(self, phase, cmd, log_name, limit_s):
        self.limits.append(limit_s)
        (self.out / log_name).write_text(f"error: {cmd[2]} cannot run on this card\n")
        return 2, 0.1


def test_a_stage_that_does_not_compose_is_its_own_failed_row_and_the_others_run(tmp_path):
    from gpt2.benchmark.candidates import LIMIT_FACTOR, run_candidates

    def compose(names):
        if names == ["fp8-head"]:
            raise ValueError("Could not override 'model.los'\nmore lines")
        return [{"name": n, "compile": True, "total_batch_size": 524288, "batch_size": 64} for n in names]

    bench = FakeBench(tmp_path)
    stages = [{"name": n} for n in STAGES]
    run_candidates(bench, stages, compose, REPO, grace_s=60, table_reserve_s=10)
    rows = {r["name"]: r for r in json.loads((tmp_path / "candidates.json").read_text())}
    assert rows["fp8-head"]["status"] == "failed"
    assert rows["fp8-head"]["detail"] == "conf/stage/fp8-head.yaml does not compose: Could not override 'model.los'"
    assert rows["flash4"] == {"name": "flash4", "builds_on": "big-batch", "status": "refused",
                              "detail": "+stage=flash4 cannot run on this card"}
    assert bench.limits == [LIMIT_FACTOR * 90] * 2  # flash4 and big-batch_cdt, each capped, not the whole budget
    assert bench.phases[-1][:2] == ("candidates", "partial")


def test_another_sweep_skips_the_candidates(tmp_path):
    from gpt2.benchmark.candidates import run_candidates

    bench = FakeBench(tmp_path, sweep_name="speedup_cpu")
    run_candidates(bench, [], lambda names: [], REPO, grace_s=60, table_reserve_s=10)
    assert bench.phases == [("candidates", "skipped", "they run beside the rows of +sweep=speedup_full, and this "
                                                      "bench ran +sweep=speedup_cpu")]
    assert not (tmp_path / "candidates.json").exists()


def test_a_candidate_built_on_another_candidate_is_compared_with_it(tmp_path):
    from gpt2.benchmark.candidates import candidates_markdown

    (tmp_path / "candidates.json").write_text(json.dumps([
        {"name": "flash4", "builds_on": "big-batch", "status": "ok", "detail": "", "ms_per_step": 900.0,
         "tokens_per_sec": 600.0},
        {"name": "mine", "builds_on": "flash4", "status": "ok", "detail": "a | b", "ms_per_step": 800.0,
         "tokens_per_sec": 660.0}]))
    md = candidates_markdown(tmp_path, [{"stage": "big-batch", "status": "ok", "tokens_per_sec": 500.0}])
    assert "| flash4 | big-batch | ok | 900.0 | 600 | 1.200x |  |" in md
    assert "| mine | flash4 | ok | 800.0 | 660 | 1.100x | a \\| b |" in md
