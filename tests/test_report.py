"""The speed-up report, built from synthetic run folders (no training, no GPU)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from gpt2.report import main
from gpt2.reporting.build import CSV_COLUMNS, EVAL_COLUMNS, build_report, load_runs
from gpt2.reporting.chart import colors, figure
from gpt2.reporting.rules import PUBLISHED
from helpers import REPO

COMMAND = "python run.py -m +stage=baseline,tf32,bf16,flash"


def make_run(folder: Path, name: str, stage: str, tok=None, status="ok", error=None, device="NVIDIA H100 80GB HBM3",
             job=None, steps=5, summary=True, step_ms=None, evals=None, **extra) -> Path:
    """Write one run folder the way the training loop does: summary.json and metrics.jsonl (step_ms: per-step
    times, else every step takes the median; evals: the evaluation rows, else one final validation)."""
    run = folder / name
    run.mkdir(parents=True)
    (run / ".hydra").mkdir()
    tokens_per_step = extra.pop("tokens_per_step", 16384)
    ms = tokens_per_step / tok * 1000 if tok else None
    data = {"stage": stage, "adds": f"what {stage} adds", "status": status, "error": error, "device": device,
            "device_type": "cpu" if device == "cpu" else "cuda", "torch_version": "2.5.1",
            "cuda_version": None if device == "cpu" else "12.4", "model": "gpt2", "batch_size": 16, "seq_len": 1024,
            "world_size": 1, "steps": steps, "steps_measured": steps - 3, "tokens_per_step": tokens_per_step,
            "grad_accum_steps": 1, "ms_per_step": ms, "ms_per_step_min": ms and ms * 0.9,
            "ms_per_step_max": ms and ms * 1.2, "tokens_per_sec": tok, "mfu": 0.25 if tok else None,
            "mfu_peak_tflops": 989.4, "mfu_peak_source": "datasheet", "compute_dtype": "bf16",
            "final_loss": 6.5 if tok else None, "val_loss": None, "peak_mem_gib": 14.2 if tok else None,
            "peak_mem_kind": "cuda max allocated", "job_num": job, "command": COMMAND,
            "started_at": "2026-11-25T10:00:00+00:00", "finished_at": "2026-11-25T10:05:00+00:00",
            "effective": {"attention": "flash"}}
    data.update(extra)
    if summary:
        (run / "summary.json").write_text(json.dumps(data))
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(steps if tok else 2):
            f.write(json.dumps({"step": step, "loss": 11.0 - step * 0.5, "lr": 3e-4, "grad_norm": 1.0,
                                "ms": step_ms[step] if step_ms else ms or 1.0, "tokens_per_sec": tok or 0.0}) + "\n")
        for rec in evals or [{"step": steps - 1, "val_loss": 6.4}]:  # an evaluation line has no "ms"
            f.write(json.dumps(rec) + "\n")
    return run


def squash(md: str) -> str:
    """The markdown with runs of spaces made one (tabulate pads right-aligned columns)."""
    return re.sub(r" {2,}", " ", md)


def line(md: str, start: str) -> str:
    return next(ln for ln in squash(md).splitlines() if ln.startswith(start))


@pytest.fixture
def sweep(tmp_path) -> Path:
    """baseline 100k tok/s, tf32 200k, bf16 failed, flash 500k."""
    folder = tmp_path / "sweep"
    make_run(folder, "0_baseline", "baseline", 100_000.0)
    make_run(folder, "1_tf32", "tf32", 200_000.0)
    make_run(folder, "2_bf16", "bf16", None, status="failed",
             error="Traceback (most recent call last):\n  File x\nRuntimeError: CUDA out of | memory")
    make_run(folder, "3_flash", "flash", 500_000.0)
    return folder


def test_rows_follow_job_numbers_not_alphabet(tmp_path):
    folder = tmp_path / "sweep"
    names = ["10_grad-accum", "9_compile", "2_bf16", "0_baseline", "1_tf32"]
    for name in names:
        make_run(folder, name, name.split("_", 1)[1], 1000.0)
    df = load_runs(folder)
    assert list(df["stage"]) == ["baseline", "tf32", "bf16", "compile", "grad-accum"]
    assert list(df["job"]) == [0, 1, 2, 9, 10]


def test_job_num_from_summary_when_folder_has_no_prefix(tmp_path):
    folder = tmp_path / "sweep"
    make_run(folder, "b", "flash", 300.0, job=3)
    make_run(folder, "a", "tf32", 200.0, job=1)
    make_run(folder, "c", "baseline", 100.0, job=0)
    assert list(load_runs(folder)["stage"]) == ["baseline", "tf32", "flash"]


def test_single_run_folder(tmp_path):
    run = make_run(tmp_path, "outputs_run", "flash", 400_000.0, job=0)
    df = load_runs(run)
    assert list(df["stage"]) == ["flash"] and df["speedup_vs_baseline"].iloc[0] == 1.0  # first ok row


def test_speedups_are_tok_per_sec_ratios_and_skip_failed(sweep):
    df = load_runs(sweep).set_index("stage")
    assert df.loc["tf32", "speedup_vs_baseline"] == pytest.approx(2.0)
    assert df.loc["flash", "speedup_vs_baseline"] == pytest.approx(5.0)
    assert df.loc["baseline", "speedup_vs_baseline"] == pytest.approx(1.0)
    assert pd.isna(df.loc["baseline", "speedup_vs_prev"])
    assert df.loc["tf32", "speedup_vs_prev"] == pytest.approx(2.0)
    assert df.loc["flash", "speedup_vs_prev"] == pytest.approx(2.5)  # vs tf32: bf16 failed
    assert df.loc["flash", "prev_stage"] == "tf32"
    assert pd.isna(df.loc["bf16", "speedup_vs_baseline"]) and pd.isna(df.loc["bf16", "speedup_vs_prev"])


def test_speedup_uses_tok_per_sec_not_ms_with_grad_accum(tmp_path):
    folder = tmp_path / "sweep"
    make_run(folder, "0_baseline", "baseline", 100_000.0)
    make_run(folder, "1_grad-accum", "grad-accum", 110_000.0, tokens_per_step=524288, grad_accum_steps=32)
    df = load_runs(folder)
    assert df["speedup_vs_baseline"].iloc[1] == pytest.approx(1.1)


def test_baseline_falls_back_to_first_ok_row(tmp_path):
    folder = tmp_path / "sweep"
    make_run(folder, "0_baseline", "baseline", None, status="failed", error="boom")
    make_run(folder, "1_tf32", "tf32", 200_000.0)
    make_run(folder, "2_bf16", "bf16", 300_000.0)
    df = load_runs(folder)
    assert list(df["baseline_stage"].unique()) == ["tf32"]
    assert df["speedup_vs_baseline"].iloc[2] == pytest.approx(1.5)
    md = build_report([folder])["md"].read_text()
    assert "against stage `tf32` (first ok stage" in md


def test_report_files_and_failed_row(sweep):
    paths = build_report([sweep])
    assert set(paths) == {"md", "csv", "png"} and all(p.is_file() for p in paths.values())
    assert paths["md"].parent == sweep
    md = paths["md"].read_text()
    flash = line(md, "| 3 | flash")
    assert "5.00x" in flash and "2.50x (vs tf32)" in flash and "500,000" in flash
    bf16 = line(md, "| 2 | bf16")
    assert "| nan |" not in md and "failed" in bf16 and "Traceback" not in bf16
    assert "RuntimeError: CUDA out of \\| memory" in bf16  # last line of the traceback, pipe escaped
    for fact in ("NVIDIA H100 80GB HBM3", "2.5.1", "12.4", "**B:** 16", "**T:** 1024", "**steps measured:** 2",
                 "2026-11-25", COMMAND):
        assert fact in md
    csv = pd.read_csv(paths["csv"])
    assert list(csv.columns) == CSV_COLUMNS
    assert list(csv["stage"]) == ["baseline", "tf32", "bf16", "flash"]
    assert csv.loc[3, "speedup_vs_baseline"] == pytest.approx(5.0)
    assert csv.loc[3, "tokens_per_sec"] == 500000.0
    assert csv.loc[2, "status"] == "failed" and "CUDA out of" in csv.loc[2, "error"]
    assert set(csv["folder"]) == {"."} and csv.loc[0, "run_dir"] == "0_baseline"
    assert paths["png"].read_bytes().startswith(b"\x89PNG")


def test_varying_batch_size_becomes_a_column(tmp_path):
    folder = tmp_path / "sweep"
    make_run(folder, "0_baseline", "baseline", 100.0, batch_size=16)
    make_run(folder, "1_flash", "flash", 200.0, batch_size=32)
    md = squash(build_report([folder])["md"].read_text())
    assert "**B:** varies (see table)" in md
    assert "| job | stage | adds | B |" in md


def test_incomplete_runs_are_shown_not_fatal(tmp_path):
    folder = tmp_path / "sweep"
    make_run(folder, "0_baseline", "baseline", 100.0)
    make_run(folder, "1_tf32", "tf32", None, status="running")
    make_run(folder, "2_bf16", "bf16", None, summary=False)  # killed hard: no summary.json
    (folder / "not_a_run").mkdir()
    (folder / "multirun.yaml").write_text("hydra: {}\n")
    df = load_runs(folder)
    assert list(df["stage"]) == ["baseline", "tf32", "bf16"]
    assert list(df["status"]) == ["ok", "incomplete", "incomplete"]
    assert "incomplete" in build_report([folder])["md"].read_text()


def test_two_folders_give_a_device_comparison(tmp_path):
    gpu, cpu = tmp_path / "gpu", tmp_path / "cpu"
    for folder, device, tok in ((cpu, "cpu", 1_000.0), (gpu, "NVIDIA H100 80GB HBM3", 18_000.0)):
        make_run(folder, "0_baseline", "baseline", tok, device=device)
        make_run(folder, "1_tf32", "tf32", tok * 2, device=device)
    make_run(gpu, "2_flash", "flash", 90_000.0)
    out = tmp_path / "out"
    paths = build_report([cpu, gpu], out_dir=out)
    md = squash(paths["md"].read_text())
    assert "## Device vs device" in md
    assert "| stage | tok/s cpu | tok/s NVIDIA H100 80GB HBM3 | NVIDIA H100 80GB HBM3 / cpu |" in md
    assert "| baseline | 1,000 | 18,000 | 18.00x |" in md
    assert "| flash | | 90,000 | |" in md
    assert "NVIDIA H100 80GB HBM3 is 18.0x faster than cpu" in md
    csv = pd.read_csv(paths["csv"])
    assert list(csv["folder"]) == ["../cpu"] * 2 + ["../gpu"] * 3
    assert list(csv["device_label"].unique()) == ["cpu", "NVIDIA H100 80GB HBM3"]
    # the slower device is the reference whatever the folder order, so the ratio reads "18x faster"
    md = squash(build_report([gpu, cpu], out_dir=out)["md"].read_text())
    assert "| stage | tok/s NVIDIA H100 80GB HBM3 | tok/s cpu | NVIDIA H100 80GB HBM3 / cpu |" in md
    assert "| baseline | 18,000 | 1,000 | 18.00x |" in md


def test_equal_devices_are_told_apart_by_folder(tmp_path):
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    make_run(a, "0_baseline", "baseline", 100.0, device="cpu")
    make_run(b, "0_baseline", "baseline", 150.0, device="cpu")
    md = squash(build_report([a, b])["md"].read_text())
    assert "| baseline | 100 | 150 | 1.50x |" in md
    assert "tok/s cpu (a)" in md and "tok/s cpu (b)" in md


def test_report_is_deterministic(sweep, tmp_path):
    other = tmp_path / "cpu"
    make_run(other, "0_baseline", "baseline", 500.0, device="cpu")
    first = {k: p.read_bytes() for k, p in build_report([sweep, other]).items()}
    second = {k: p.read_bytes() for k, p in build_report([sweep, other]).items()}
    assert first == second


def test_reference_table_is_separate_and_labelled(sweep):
    md = build_report([sweep])["md"].read_text()
    ref = md[md.index("## Published reference figures (not measured here)"):]
    assert "published figures, not measured here" in ref
    assert "seed README, H100, ms/step" in ref and "build-nanogpt video, A100, ms/step" in ref
    assert "| baseline | ~400 | ~1000 |" in ref and "| nice-vocab | ~58 | ~93 |" in ref
    assert "~400" not in md[:md.index("## Published reference")]  # never mixed with measured columns


def test_cli_missing_folder_is_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found" in err and "nope" in err


def test_cli_empty_folder_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no runs" in err


def test_cli_writes_into_out(sweep, tmp_path, capsys):
    out = tmp_path / "elsewhere"
    assert main([str(sweep), "--out", str(out)]) == 0
    assert (out / "report.md").is_file() and (out / "report.png").is_file()
    assert not (sweep / "report.md").exists()
    assert "report.md" in capsys.readouterr().out


@pytest.mark.slow
def test_module_entrypoint_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gpt2.report", str(tmp_path / "missing")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_matches_api_byte_for_byte_in_a_fresh_process(sweep):
    """A fresh interpreter (other hash seed, other memory layout) writes the same bytes as this one."""
    first = {k: p.read_bytes() for k, p in build_report([sweep]).items()}
    proc = subprocess.run([sys.executable, "-m", "gpt2.report", str(sweep)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert {k: (sweep / f"report.{k}").read_bytes() for k in first} == first


def test_odd_inputs_are_one_line(tmp_path, capsys):
    run = tmp_path / "sweep" / "0_baseline"
    run.mkdir(parents=True)
    (run / "summary.json").write_text("[1, 2, 3]")  # valid JSON, not a summary
    assert main([str(tmp_path / "sweep")]) == 0  # the run shows as incomplete
    assert "incomplete" in (tmp_path / "sweep" / "report.md").read_text()
    (tmp_path / "a-file").write_text("x")
    capsys.readouterr()
    assert main([str(tmp_path / "sweep"), "--out", str(tmp_path / "a-file")]) == 2
    assert capsys.readouterr().err == f"error: report: --out {tmp_path / 'a-file'} is a file, not a folder; give a " \
                                      "folder (it is created if missing)\n"
    assert (tmp_path / "a-file").read_text() == "x"


def test_a_noisy_row_is_flagged_and_a_steady_one_is_not(tmp_path):
    folder = tmp_path / "sweep"
    warm = [5000.0, 4000.0, 3000.0]  # the first steps (steps - steps_measured) are warm-up: never judged
    steady = warm + [160.0, 158.0, 161.0, 157.0, 162.0, 159.0, 160.0, 240.0, 158.0, 161.0]  # one slow step
    noisy = warm + [334.0, 1249.0, 3620.0, 400.0, 2900.0, 1249.0, 350.0, 3100.0, 1500.0, 380.0]
    make_run(folder, "0_baseline", "baseline", 3200.0, steps=13, step_ms=steady)
    make_run(folder, "1_tf32", "tf32", 2340.0, steps=13, step_ms=noisy)
    make_run(folder, "2_bf16", "bf16", None, status="failed", error="boom")
    df = load_runs(folder)
    assert list(df["noisy"].astype(object)) == [False, True, pd.NA]
    assert df["ms_iqr_rel"].iloc[0] < 0.1 < df["ms_iqr_rel"].iloc[1]
    paths = build_report([folder])
    md = squash(paths["md"].read_text())
    assert "interquartile range of its steady-state step times exceeds 10% of their median" in md
    assert "Flagged: 1 of 2 timed rows (tf32)" in md
    assert line(md, "| 1 | tf32").count("noisy") == 1 and "noisy" not in line(md, "| 0 | baseline")
    assert list(pd.read_csv(paths["csv"])["noisy"].astype(object).fillna("")) == [False, True, ""]


def test_noise_falls_back_to_the_summary_range_without_step_times(tmp_path):
    folder = tmp_path / "sweep"
    make_run(folder, "0_baseline", "baseline", 100.0, ms_per_step_min=100.0, ms_per_step_max=120.0)
    make_run(folder, "1_tf32", "tf32", 100.0, ms_per_step_min=334.0, ms_per_step_max=3620.0)
    for run in folder.iterdir():
        (run / "metrics.jsonl").unlink()
    assert list(load_runs(folder)["noisy"]) == [False, True]
    md = squash(build_report([folder])["md"].read_text())
    assert "max/min 10.8x noisy" in line(md, "| 1 | tf32") and "Flagged: 1 of 2 timed rows (tf32)" in md


def test_measured_peak_mfu_is_marked(tmp_path):
    cpu, mixed = tmp_path / "cpu", tmp_path / "mixed"
    for folder in (cpu, mixed):
        make_run(folder, "0_baseline", "baseline", 100.0, device="cpu", mfu_peak_source="measured")
    make_run(cpu, "1_tf32", "tf32", 100.0, device="cpu", mfu_peak_source="measured")
    md = squash(build_report([cpu])["md"].read_text())
    assert "| MFU % (measured peak) |" in md and "- **MFU:** against a peak measured on this machine" in md
    assert "not charted" in md
    make_run(mixed, "1_tf32", "tf32", 100.0, device="cpu", mfu_peak_source="datasheet")
    md = squash(build_report([mixed])["md"].read_text())
    assert "| MFU % |" in md and "cells marked (measured peak)" in md
    assert "25.0 (measured peak)" in line(md, "| 0 | baseline") and "measured" not in line(md, "| 1 | tf32")
    make_run(tmp_path / "h100", "0_baseline", "baseline", 1.0)  # a datasheet peak: nothing to mark
    datasheet = build_report([tmp_path / "h100"])["md"].read_text()
    assert "measured peak" not in datasheet and "**MFU:**" not in datasheet


def test_mfu_above_the_measured_peak_is_not_printed_as_a_figure(tmp_path):
    folder = tmp_path / "cpu"
    make_run(folder, "0_baseline", "baseline", 100.0, device="cpu", mfu_peak_source="measured", mfu=1.4,
             mfu_note="above 100 % of the measured peak: the peak was measured on a busy machine")
    make_run(folder, "1_tf32", "tf32", 100.0, device="cpu", mfu_peak_source="measured", mfu=0.3, mfu_note=None)
    out = build_report([folder])
    md = squash(out["md"].read_text())
    assert "n/a (above the measured peak)" in line(md, "| 0 | baseline") and "140.0" not in md
    assert "| 30.0 |" in line(md, "| 1 | tf32")
    csv = pd.read_csv(out["csv"])
    assert csv["mfu_note"].iloc[0].startswith("above 100 %") and pd.isna(csv["mfu_note"].iloc[1])


def test_grad_accum_row_shows_the_setting_that_ran(tmp_path):
    folder = tmp_path / "sweep"
    adds = "total batch 524,288 tokens (2^19, GPT-3 small's ~0.5M) by gradient accumulation"
    make_run(folder, "0_grad-accum", "grad-accum", 100.0, adds=adds, tokens_per_step=16384, grad_accum_steps=32)
    make_run(folder, "1_grad-accum", "grad-accum", 100.0, adds=adds, tokens_per_step=524288, grad_accum_steps=32)
    make_run(folder, "2_big-batch", "big-batch", 100.0, adds="micro-batch B=64 (the same 524,288 tokens/step)",
             tokens_per_step=524288, batch_size=8)
    md = squash(build_report([folder])["md"].read_text())
    assert f"{adds} (ran: 16,384 tokens/step, 32 micro-steps) |" in line(md, "| 0 | grad-accum")
    assert "(ran:" not in line(md, "| 1 | grad-accum")  # as the stage says: nothing added
    assert "(the same 524,288 tokens/step) (ran: B=8) |" in line(md, "| 2 | big-batch")


def test_runs_of_different_models_are_grouped_never_compared(tmp_path):
    folder = tmp_path / "2026-11-25"  # outputs/DATE: single runs of two models, folders named by time
    make_run(folder, "10-00-00", "baseline", 1_000.0, model="tiny", seq_len=64, job=None)
    make_run(folder, "10-05-00", "flash", 3_000.0, model="tiny", seq_len=64)
    make_run(folder, "11-00-00", "baseline", 100.0, model="gpt2")
    make_run(folder, "11-30-00", "flash", 400.0, model="gpt2")
    make_run(folder, "12-00-00", "tf32", None, status="failed", error="boom", model="gpt2", device=None)
    df = load_runs(folder)
    assert list(df["speedup_vs_baseline"].round(6).fillna(-1)) == [1.0, 3.0, 1.0, 4.0, -1]
    assert pd.isna(df["speedup_vs_prev"].iloc[2])  # the gpt2 baseline is not compared with tiny's flash
    assert df["group"].nunique() == 2 and df["group"].iloc[4] == df["group"].iloc[2]  # failed joins its model
    assert list(df["key"]) == ["baseline [model=tiny, T=64]", "flash [model=tiny, T=64]",
                               "baseline [model=gpt2, T=1024]", "flash [model=gpt2, T=1024]",
                               "tf32 [model=gpt2, T=1024]"]
    paths = build_report([folder])
    md = squash(paths["md"].read_text())
    assert "these runs form 2 groups" in md and "speed-ups are computed only within a group" in md
    tiny = md.index("### model=tiny, device=NVIDIA H100 80GB HBM3, T=64, world size=1")
    gpt2 = md.index("### model=gpt2, device=NVIDIA H100 80GB HBM3, T=1024, world size=1")
    assert tiny < md.index("| 4.00x |") and gpt2 < md.index("| 4.00x |") and md.index("| 3.00x |") < gpt2
    assert "failed" in md[gpt2:]
    csv = pd.read_csv(paths["csv"])
    assert csv["group"].nunique() == 2 and list(csv["speedup_vs_baseline"].fillna(-1)) == [1, 3, 1, 4, -1]


def test_chart_with_many_runs_has_distinct_colours_and_plots_tokens_seen(tmp_path):
    folder = tmp_path / "sweep"
    for i in range(13):
        make_run(folder, f"{i}_s{i}", f"s{i}", 1000.0 + i, tokens_per_step=512 * (32 if i == 12 else 1))
    df = load_runs(folder)
    fig = figure([df], ["cpu"])
    lines = fig.axes[1].lines
    assert len(lines) == 13 and len({ln.get_color() for ln in lines}) == 13
    assert len({(ln.get_linestyle(), ln.get_marker()) for ln in lines[:4]}) == 4  # equal curves stay visible
    assert list(lines[0].get_xdata()) == [512 * (s + 1) for s in range(5)]  # tokens seen, not steps
    assert list(lines[12].get_xdata())[-1] == 512 * 32 * 5
    assert fig.axes[1].get_xscale() == "log"  # grad-accum's 32x the tokens would squash the others
    bars = fig.axes[0].patches
    assert len({tuple(b.get_facecolor()) for b in bars}) == 13
    for n in (10, 20, 21, 40):
        assert len(set(colors(n))) == n
    assert build_report([folder])["png"].read_bytes().startswith(b"\x89PNG")


def hellaswag(step, acc_norm):
    """A HellaSwag row as gpt2/evaluation/hellaswag.py's evaluate_in_run writes it."""
    return {"step": step, "hellaswag_acc_norm": acc_norm, "hellaswag_acc": acc_norm - 0.01, "hellaswag_n": 100}


@pytest.fixture
def evaluated(tmp_path) -> Path:
    """A run that validated and ran HellaSwag every 2 steps, one that only validated (stopped early, its summary
    without val_loss), and a speed run with one final validation. 16,384 tokens per step."""
    folder = tmp_path / "evals"
    make_run(folder, "0_baseline", "baseline", 100_000.0, steps=8, val_loss=5.5, hellaswag_acc_norm=0.29,
             evals=[{"step": 1, "val_loss": 7.0}, hellaswag(1, 0.25), {"step": 3, "val_loss": 5.0},
                    hellaswag(3, 0.31), {"step": 5, "val_loss": 5.6}, hellaswag(5, 0.27),
                    {"step": 5, "val_loss": 5.2}, hellaswag(5, 0.28),  # resumed: step 5 evaluated again
                    {"step": 7, "val_loss": 5.5}, hellaswag(7, 0.29)])
    make_run(folder, "1_flash", "flash", 200_000.0, steps=8, status="interrupted",
             evals=[{"step": 1, "val_loss": 6.9}, {"step": 3, "val_loss": 6.1}, {"step": 5, "val_loss": 6.3}])
    make_run(folder, "2_tf32", "tf32", 150_000.0, steps=8, val_loss=6.4)
    return folder


def test_evaluation_columns_show_final_and_best(evaluated):
    paths = build_report([evaluated])
    md = squash(paths["md"].read_text())
    assert ("| final loss | val loss | val loss (best) | HellaSwag acc_norm | HellaSwag acc_norm (best) | status |"
            in md)
    assert "| 6.500 | 5.500 | 5.000 | 0.2900 | 0.3100 | ok |" in line(md, "| 0 | baseline")
    # no val_loss in its summary: the last validation is its final; it ran no HellaSwag: blank cells
    assert "| 6.500 | 6.300 | 6.100 | | | interrupted |" in line(md, "| 1 | flash")
    assert "| 6.500 | 6.400 | 6.400 | | | ok |" in line(md, "| 2 | tf32")
    assert "- **evaluations:** `val loss (best)` is the lowest" in md
    measured, reference = md.split("## Published reference figures (not measured here)")
    assert "| GPT-2 124M (published) | 3.2924 | 0.2955 |" in reference
    assert not any("3.2924" in ln or "0.2955" in ln for ln in measured.splitlines() if ln.startswith("|"))
    csv = pd.read_csv(paths["csv"])
    assert list(csv.columns) == CSV_COLUMNS + EVAL_COLUMNS
    assert list(csv["val_loss_best"]) == [5.0, 6.1, 6.4] and list(csv["val_evals"]) == [4, 3, 1]
    assert list(csv["hellaswag_acc_norm"].fillna(-1)) == [0.29, -1, -1]
    assert list(csv["hellaswag_acc_norm_best"].fillna(-1)) == [0.31, -1, -1]
    assert list(csv["hellaswag_evals"]) == [4, 0, 0]


def test_hellaswag_alone_shows_without_a_best_val_loss(tmp_path):
    folder = tmp_path / "evals"
    make_run(folder, "0_baseline", "baseline", 100.0, hellaswag_acc_norm=0.26,
             evals=[hellaswag(4, 0.26), {"step": 4, "val_loss": 6.4}])
    md = squash(build_report([folder])["md"].read_text())
    assert "| val loss | HellaSwag acc_norm | HellaSwag acc_norm (best) | status |" in md
    assert "val loss (best)" not in md and "| 0.2600 | 0.2600 | ok |" in line(md, "| 0 | baseline")


def test_no_evaluation_columns_or_panels_without_evaluations(sweep):
    """A speed sweep validates once at its end: no best to show, no curve to draw; its report is as before."""
    paths = build_report([sweep])
    md = paths["md"].read_text()
    assert "val loss (best)" not in md and "HellaSwag" not in md and "GPT-2 124M" not in md
    assert "evaluations" not in md
    assert list(pd.read_csv(paths["csv"]).columns) == CSV_COLUMNS
    assert len(figure([load_runs(sweep)], ["h100"]).axes) == 2


def png_height(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[20:24], "big")  # the IHDR chunk: width, then height


def test_chart_has_evaluation_panels_with_published_lines(evaluated, sweep):
    fig = figure([load_runs(evaluated)], ["h100"])
    assert len(fig.axes) == 4  # throughput, train loss, val loss, HellaSwag
    val, hs = fig.axes[2], fig.axes[3]
    assert val.get_ylabel() == "val loss" and hs.get_ylabel() == "HellaSwag acc_norm"
    labels = [ln.get_label() for ln in val.lines]
    assert labels == ["baseline", "flash", "tf32", f"GPT-2 124M (published): {PUBLISHED['val_loss']}"]
    assert [ln.get_label() for ln in hs.lines] == ["baseline", "GPT-2 124M (published): 0.2955"]
    assert "published" in val.get_title() and any("not measured here" in t.get_text() for t in val.texts)
    assert "0.2955" not in " ".join(labels) and "3.2924" not in " ".join(ln.get_label() for ln in hs.lines)
    assert list(val.lines[-1].get_ydata()) == [3.2924, 3.2924] and list(hs.lines[-1].get_ydata()) == [0.2955] * 2
    assert list(val.lines[0].get_xdata()) == [16384 * s for s in (2, 4, 6, 8)]  # tokens seen: (step + 1) x tokens
    assert list(val.lines[0].get_ydata()) == [7.0, 5.0, 5.2, 5.5]  # the re-evaluated step keeps its last value
    assert list(hs.lines[0].get_ydata()) == [0.25, 0.31, 0.28, 0.29]
    assert val.lines[0].get_color() == fig.axes[1].lines[0].get_color()  # a run keeps its colour across panels
    two = figure([load_runs(evaluated), load_runs(sweep)], ["a", "b"])
    assert len(two.axes) == 5 and [ln.get_label() for ln in two.axes[4].lines][0] == "baseline (a)"
    with_evals, without = build_report([evaluated])["png"], build_report([sweep])["png"]
    assert png_height(with_evals) > png_height(without) + 500


def test_report_with_evaluations_is_deterministic(evaluated):
    first = {k: p.read_bytes() for k, p in build_report([evaluated]).items()}
    assert {k: p.read_bytes() for k, p in build_report([evaluated]).items()} == first



def test_a_line_marks_where_the_stages_beyond_the_seed_begin(tmp_path):
    from gpt2.bench import sweep_stage_names
    from gpt2.reporting.rules import BEYOND_THE_SEED, SEED_STAGES

    assert list(SEED_STAGES) == sweep_stage_names("speedup")  # the report's list is the seed's sweep
    folder = tmp_path / "sweep"
    for i, (stage, tok) in enumerate([("gpt3-optim", 100.0), ("grad-accum", 110.0), ("compile", 150.0),
                                      ("fused-loss", 151.0)]):
        make_run(folder, f"{i}_{stage}", stage, tok)
    md = squash(build_report([folder])["md"].read_text())
    rows = [r for r in md.splitlines() if r.startswith("| ") and ("| " + BEYOND_THE_SEED) in r or
            re.match(r"\| \d+ \| ", r)]
    stages = [r.split("|")[2].strip() for r in rows]
    assert stages == ["gpt3-optim", "grad-accum", BEYOND_THE_SEED, "compile", "fused-loss"]
    assert "1.36x" in line(md, "| 2 | compile")  # vs previous still compares with grad-accum, the line aside
    csv = pd.read_csv(folder / "report.csv")
    assert list(csv["stage"]) == ["gpt3-optim", "grad-accum", "compile", "fused-loss"]  # data only in the CSV


# ---------------------------------------------------------------- bad input: one bad file never stops the report

BAD_SUMMARIES = {  # what a summary.json holds -> what its row's status must say
    "past int64": ('{"stage": "bf16", "status": "ok", "steps": 100000000000000000000000}',
                   "unreadable: steps=100000000000000000000000 does not fit a 64-bit integer"),
    "Infinity": ('{"stage": "bf16", "status": "ok", "tokens_per_sec": Infinity}',
                 "unreadable: summary.json holds Infinity, which JSON does not allow"),
    "NaN": ('{"stage": "bf16", "status": "ok", "mfu": NaN}', "unreadable: summary.json holds NaN, which JSON"),
    "non-finite string": ('{"stage": "bf16", "status": "ok", "tokens_per_sec": "inf"}',
                          "unreadable: tokens_per_sec=inf is not a finite number"),
    "string for a number": ('{"stage": "bf16", "status": "ok", "tokens_per_sec": "fast"}',
                            "unreadable: tokens_per_sec='fast' is not a number"),
    "bool for a number": ('{"stage": "bf16", "status": "ok", "batch_size": true}',
                          "unreadable: batch_size=true is not a whole number"),
    "fraction for a count": ('{"stage": "bf16", "status": "ok", "steps": 2.5}',
                             "unreadable: steps=2.5 is not a whole number"),
    "too large for a float": ('{"stage": "bf16", "status": "ok", "ms_per_step": 1' + "0" * 400 + "}",
                              "unreadable: ms_per_step=1000000000000000000000000000000000000... is too large"),
    "a list for text": ('{"stage": "bf16", "status": "ok", "device": ["a", "b"]}',
                        'unreadable: device=["a", "b"] is not text'),
    "invalid JSON": ('{"stage": "bf16", "status": ', "unreadable: summary.json is not valid JSON (Expecting value at "
                                                    "line 1, column 29)"),
    "not UTF-8": (b"\xff\xfe{}", "unreadable: summary.json is not UTF-8 text"),
}


@pytest.mark.parametrize("case", list(BAD_SUMMARIES))
def test_one_unreadable_summary_is_marked_and_every_other_row_reported(sweep, case, caplog):
    text, status = BAD_SUMMARIES[case]
    bad = sweep / "2_bf16" / "summary.json"
    bad.write_bytes(text if isinstance(text, bytes) else text.encode())
    paths = build_report([sweep])
    md = squash(paths["md"].read_text())
    row = line(md, "| 2 | bf16")
    assert status in row and "| nan |" not in row
    assert row.count("x |") == 0 and "6.500" not in row  # no figures from a file that cannot be trusted
    assert "5.00x" in line(md, "| 3 | flash") and "2.50x (vs tf32)" in line(md, "| 3 | flash")
    csv = pd.read_csv(paths["csv"])
    assert list(csv["stage"]) == ["baseline", "tf32", "bf16", "flash"]
    assert csv.loc[2, "status"].startswith(status) and pd.isna(csv.loc[2, "tokens_per_sec"])
    assert paths["png"].read_bytes().startswith(b"\x89PNG")
    assert "shown as unreadable" in caplog.text  # and one warning line says which folder


def test_a_diverged_run_keeps_its_nan_loss_and_the_report_its_row(tmp_path):
    """gpt2/runs/job.py writes a non-finite loss as the string "nan" (JSON has no NaN): that is a readable run."""
    folder = tmp_path / "sweep"
    make_run(folder, "0_baseline", "baseline", 100.0)
    make_run(folder, "1_tf32", "tf32", 90.0, status="diverged", final_loss="nan", val_loss="inf")
    md = squash(build_report([folder])["md"].read_text())
    assert "| diverged |" in line(md, "| 1 | tf32") and "unreadable" not in md
    assert "| | inf | diverged |" in line(md, "| 1 | tf32")  # the NaN loss is blank, the infinite one says so


def test_a_number_at_the_edge_of_int64_is_kept_exactly(tmp_path):
    folder = tmp_path / "sweep"
    make_run(folder, "0_baseline", "baseline", 100.0, seq_len=2 ** 63 - 1)
    make_run(folder, "1_tf32", "tf32", 100.0, seq_len=None)  # a column of ints and blanks: no float64 rounding
    df = load_runs(folder)
    assert df["seq_len"].iloc[0] == 2 ** 63 - 1 and list(df["status"]) == ["ok", "ok"]
    assert f"**T:** {2 ** 63 - 1}" in build_report([folder])["md"].read_text()


def test_a_job_number_past_int64_is_part_of_the_name(tmp_path):
    folder = tmp_path / "sweep"
    make_run(folder, "0_baseline", "baseline", 100.0)
    make_run(folder, "99999999999999999999_flash", "flash", 200.0, summary=False)
    df = load_runs(folder)
    assert list(df["stage"]) == ["baseline", "99999999999999999999_flash"] and pd.isna(df["job"].iloc[1])


def test_damaged_metrics_lines_do_not_stop_the_report(sweep):
    with open(sweep / "1_tf32" / "metrics.jsonl", "a") as f:
        f.write('{"step": 1' + "0" * 400 + ', "loss": 1' + "0" * 400 + ', "ms": 1' + "0" * 400 + "}\n")
        f.write('{"step": Infinity, "val_loss": 1' + "0" * 400 + "}\n[1, 2]\n\"text\"\n")
    (sweep / "3_flash" / "metrics.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    paths = build_report([sweep])
    assert "5.00x" in line(squash(paths["md"].read_text()), "| 3 | flash")
    assert paths["png"].read_bytes().startswith(b"\x89PNG")


# ---------------------------------------------------------------- markup in run data is shown, never rendered

def cells(row: str) -> list:
    """A GFM table row split as GitHub splits it: at every pipe not escaped by a backslash."""
    out, cell, escaped = [], "", False
    for char in row.strip()[1:-1]:
        if char == "|" and not escaped:
            out.append(cell)
            cell = ""
        else:
            cell += char
        escaped = char == "\\" and not escaped
    return out + [cell]


NASTY = "fl|ash <script>alert(1)</script> `code` \\| $x{$ &amp;\n## heading"


def test_markup_in_stage_and_folder_names_cannot_break_or_inject(tmp_path):
    folder = tmp_path / "sweep"
    make_run(folder, "0_baseline", "baseline", 100.0)
    make_run(folder, "1_tf32", NASTY, 200.0, error="boom | <img src=x onerror=alert(1)>", status="failed",
             command="python run.py ```x``` stage.name='<b>'")
    make_run(folder, "2_x|<i>`y`", "flash", 300.0, summary=False)  # a folder name, no summary: its stage
    paths = build_report([folder])
    md = paths["md"].read_text()
    # a command is shown in a code span (where HTML is text) whose fence is longer than any run of backticks in it
    span = "````python run.py ```x``` stage.name='<b>'````"
    assert span in md
    md = md.replace(span, "")
    assert "<script" not in md and "<img" not in md and "<i>" not in md and "<b>" not in md
    assert "&lt;script>alert(1)&lt;/script>" in md and "&amp;amp;" in md
    assert "\n## heading" not in md and "`code`" not in md
    header = next(ln for ln in md.splitlines() if re.match(r"\|\s+job \|", ln))
    rows = [ln for ln in md.splitlines() if re.match(r"\|\s+\d+ \|", ln)]
    assert len(rows) == 3 and all(len(cells(r)) == len(cells(header)) for r in rows)
    stage = cells(rows[1])[1].strip()
    assert stage == "fl\\|ash &lt;script>alert(1)&lt;/script> &#96;code&#96; \\\\\\| $x{$ &amp;amp; ## heading"
    assert cells(rows[2])[1].strip() == "x\\|&lt;i>&#96;y&#96;"
    assert pd.read_csv(paths["csv"])["stage"].iloc[1] == NASTY  # the CSV keeps the data as it was
    assert paths["png"].read_bytes().startswith(b"\x89PNG")  # "$x{$" is no mathtext for the chart


def test_one_command_with_backticks_gets_a_longer_fence(tmp_path):
    folder = tmp_path / "sweep"
    make_run(folder, "0_baseline", "baseline", 100.0, command="echo ```` done")
    md = build_report([folder])["md"].read_text()
    assert "Command:\n\n`````\necho ```` done\n`````\n" in md


def test_runs_of_one_stage_with_inductor_options_are_told_apart(tmp_path):
    folder = tmp_path / "sweep"
    make_run(folder, "0_big-batch", "big-batch", 100.0)
    make_run(folder, "1_big-batch", "big-batch", 110.0, effective={
        "attention": "flash", "compile_options": {"epilogue_fusion": False, "coordinate_descent_tuning": True}})
    md = squash(build_report([folder])["md"].read_text())
    assert "(Inductor:" not in line(md, "| 0 | big-batch")
    assert "| what big-batch adds (Inductor: coordinate_descent_tuning=True, epilogue_fusion=False) |" in line(
        md, "| 1 | big-batch")
    header = (folder / "report.csv").read_text().splitlines()[0].split(",")
    assert header == CSV_COLUMNS  # the options live in the row's text, not in a new CSV column


def test_compile_options_of_another_shape_make_the_row_unreadable(tmp_path):
    folder = tmp_path / "sweep"
    make_run(folder, "0_big-batch", "big-batch", 100.0, effective={"compile_options": ["coordinate_descent"]})
    make_run(folder, "1_big-batch", "big-batch", 100.0, effective="flash")  # no map at all: nothing to show
    df = load_runs(folder)
    assert df["status"].tolist() == ['unreadable: effective.compile_options=["coordinate_descent"] is not a map of '
                                     'Inductor option names to values', "ok"]
