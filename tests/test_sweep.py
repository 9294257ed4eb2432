"""Whole sweeps through `python run.py -m`, as a user runs them: every stage end to end on the CPU,
isolation between the jobs of one process, a failing stage, and the report written at the end."""

import pandas as pd
import pytest

from helpers import STAGES, TINY_SWEEP, data_args, run_py, summaries

pytestmark = pytest.mark.slow  # every test runs a sweep through `python run.py -m`


@pytest.fixture(scope="module")
def all_stages(tmp_path_factory, shakespeare_path):
    tmp = tmp_path_factory.mktemp("all_stages")
    small_total = "'train.total_batch_size=128'"  # 2 micro-steps of B=2, T=32 instead of 2^19 tokens
    # the stages after compile are compiled too; one compiled stage is enough to prove the sweep compiles on a
    # CPU (minutes each on 2 cores), and they are tested compiled on their own (tests/test_fused_loss.py)
    overrides = {stage: [small_total] + (["'train.compile=false'"] if i > STAGES.index("compile") else [])
                 for i, stage in enumerate(STAGES) if i >= STAGES.index("grad-accum")}
    result = run_py("-m", f"+stage={','.join(STAGES)}", *TINY_SWEEP, *data_args(tmp, shakespeare_path),
                    *[f"+sweep.stage_overrides.{stage}=[{','.join(extra)}]" for stage, extra in overrides.items()],
                    f"hydra.sweep.dir={tmp / 'sweep'}")
    return result, tmp / "sweep"


def test_every_stage_runs_in_order(all_stages):
    result, sweep = all_stages
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = summaries(sweep)
    assert list(runs) == [f"{i}_{stage}" for i, stage in enumerate(STAGES)]
    assert all(s["status"] == "ok" and s["steps"] == 3 for s in runs.values())
    for name in runs:
        assert len((sweep / name / "metrics.jsonl").read_text().splitlines()) >= 3


def test_effective_settings_match_each_stage(all_stages):
    runs = {s["stage"]: s["effective"] for s in summaries(all_stages[1]).values()}
    base = runs["baseline"]
    assert base["matmul_precision"] == "highest" and base["autocast_dtype"] is None
    assert base["attention"] == "manual" and base["vocab_size"] == 50257
    assert base["optimizer"]["class"] == "AdamW" and base["optimizer"]["betas"] == [0.9, 0.999]
    assert base["optimizer"]["fused"] is False and len(base["optimizer"]["weight_decay_groups"]) == 1
    assert base["lr_schedule"]["name"] == "constant" and base["grad_clip"] is None
    assert base["grad_accum_steps"] == 1 and base["compiled"] is False and base["world_size"] == 1
    assert runs["tf32"]["matmul_precision"] == "high" and runs["tf32"]["autocast_dtype"] is None
    assert any("no effect" in note for note in runs["tf32"]["notes"])  # TF32 does nothing on a CPU
    assert runs["bf16"]["autocast_dtype"] == "bfloat16" and runs["bf16"]["attention"] == "manual"
    assert runs["flash"]["attention"] == "flash" and runs["flash"]["vocab_size"] == 50257
    assert runs["nice-vocab"]["vocab_size"] == 50304
    gpt3 = runs["gpt3-optim"]
    assert gpt3["optimizer"]["betas"] == [0.9, 0.95] and gpt3["optimizer"]["fused"] is True
    assert [g["weight_decay"] for g in gpt3["optimizer"]["weight_decay_groups"]] == [0.1, 0.0]
    assert gpt3["lr_schedule"]["name"] == "cosine" and gpt3["grad_clip"] == 1.0 and gpt3["grad_accum_steps"] == 1
    assert runs["grad-accum"]["grad_accum_steps"] == 2 and runs["grad-accum"]["compiled"] is False
    assert runs["compile"]["compiled"] is True and runs["compile"]["grad_accum_steps"] == 2
    assert runs["compile"]["loss"] == "plain" and runs["fused-loss"]["loss"] == "fused"
    assert runs["big-batch"]["loss"] == "fused"  # (its B=64 is the command line's B=2 here)


def test_sweep_writes_a_report_in_stage_order(all_stages):
    sweep = all_stages[1]
    for name in ("report.md", "report.csv", "report.png"):
        assert (sweep / name).is_file(), name
    table = pd.read_csv(sweep / "report.csv")
    assert list(table["stage"]) == STAGES
    base = table.loc[table["stage"] == "baseline", "tokens_per_sec"].item()
    for _, row in table.iterrows():
        assert row["speedup_vs_baseline"] == pytest.approx(row["tokens_per_sec"] / base)
    tok = list(table["tokens_per_sec"])
    assert list(table["speedup_vs_prev"])[1:] == pytest.approx([b / a for a, b in zip(tok, tok[1:])])
    assert "| compile |" in (sweep / "report.md").read_text()


def test_failing_stage_and_job_isolation(tmp_path, shakespeare_path):
    # bf16 first, then the baseline in the same process: the baseline must not inherit bf16's flags;
    # tf32 is made to fail (a batch that does not divide) and must become a failed row, not a crash
    result = run_py("-m", "+stage=bf16,baseline,tf32", *TINY_SWEEP, *data_args(tmp_path, shakespeare_path),
                    "+sweep.stage_overrides.tf32=['train.total_batch_size=1000']",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    runs = summaries(tmp_path / "sweep")
    bf16, baseline, tf32 = runs["0_bf16"], runs["1_baseline"], runs["2_tf32"]
    assert bf16["effective"]["autocast_dtype"] == "bfloat16" and bf16["effective"]["matmul_precision"] == "high"
    assert baseline["effective"]["matmul_precision"] == "highest"
    assert baseline["effective"]["autocast_dtype"] is None
    assert tf32["status"] == "failed" and "train.total_batch_size=1000" in tf32["error"]
    table = pd.read_csv(tmp_path / "sweep" / "report.csv")
    assert list(table["stage"]) == ["bf16", "baseline", "tf32"]
    assert list(table["status"]) == ["ok", "ok", "failed"]
