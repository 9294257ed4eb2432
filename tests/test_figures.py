"""Every figure the READMEs quote comes from a committed raw file: the tables of README.md and
experiments/*/README.md are rebuilt from the run folders and results.json files (tests/readme_figures.py) and
compared cell by cell, and each committed report.md is rebuilt by `python -m gpt2.report` unchanged."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import readme_figures as figures

REPO = figures.REPO


def readme(path: str) -> str:
    return (REPO / path).read_text()


def assert_same_table(path: str, header: list, expected: list) -> None:
    """The README's table with this header holds `expected`, cell for cell; else every difference is named and
    the table as the raw files make it is printed, ready to paste."""
    found = figures.table(readme(path), header)
    wrong = [f"{len(found)} rows in {path}, {len(expected)} from the raw files"] if len(found) != len(expected) else []
    for i, (got, want) in enumerate(zip(found, expected)):
        wrong += [f"row {i + 1} ({want[0]}), {header[j]!r}: {path} says {a!r}, the raw files {b!r}"
                  for j, (a, b) in enumerate(zip(got, want)) if a != b]
        if len(got) != len(want):
            wrong.append(f"row {i + 1} ({want[0]}): {len(got)} cells, expected {len(want)}")
    assert not wrong, "\n".join(wrong) + "\n\nfrom the raw files:\n" + figures.as_markdown(header, expected)


@pytest.fixture(scope="module")
def sweep_tables():
    return figures.sweep_tables()


@pytest.mark.parametrize("path, header", [
    ("README.md", figures.CPU_HEADER), ("README.md", figures.H100_HEADER),
    ("experiments/cpu-speedup/README.md", figures.CPU_EXPERIMENT_HEADER),
    ("experiments/h100-speedup/README.md", figures.H100_EXPERIMENT_HEADER),
    ("experiments/h200-speedup/README.md", figures.H200_EXPERIMENT_HEADER)],
    ids=["README-cpu", "README-h100", "cpu-speedup", "h100-speedup", "h200-speedup"])
def test_stage_tables_are_the_committed_runs(sweep_tables, path, header):
    assert_same_table(path, header, sweep_tables[path, tuple(header)])


@pytest.mark.parametrize("key", list(figures.GPU_TABLES), ids=["h200-profile", "fused-loss-cpu", "fused-loss-h200",
                                                               "h200-fused-loss"])
def test_bench_tables_are_their_results_files(key):
    path, header = key
    assert_same_table(path, list(header), figures.GPU_TABLES[key]())


def test_sentences_quote_the_committed_runs():
    text = figures.words(readme("README.md"))
    for sentence in figures.sweep_sentences()["README.md"] + [figures.fused_sentence()]:
        assert sentence in text, f"README.md should say, from the raw files: {sentence}"


@pytest.mark.parametrize("path", list(figures.ceiling_sentences()))
def test_measured_ceilings_are_env_json(path):
    text = figures.words(readme(path))
    for sentence in figures.ceiling_sentences()[path]:
        assert sentence in text, f"{path} should say, from env.json: {sentence}"


def test_the_table_parser_reads_what_github_shows():
    header, rows = figures.tables("| a | b \\| c |\n| --- | ---: |\n| 1 | x\\|y |\n\n| z |\n")[0]
    assert header == ["a", "b \\| c"] and rows == [["1", "x\\|y"]]
    assert figures.sci(0.0023458) == "2.3e-3" and figures.words("a\n  b") == "a b"
    assert FIGURE.findall("0.986 at 124M, 7,106 tok/s, 2.39 s. On 127.0.0.1 with torch 2.13.0") == [
        "0.986", "7,106 tok/s", "2.39"]


# ---------------------------------------------------------------- the CPU benches: figures only from results.json

# a measured ratio, time or rate; not an address or a version (127.0.0.1, torch 2.13.0)
FIGURE = re.compile(r"(?<![\d.])\d+\.\d+(?!\d|\.\d)|\b\d{1,3}(?:,\d{3})+ tok/s")


def bench_bullet(name: str) -> str:
    """README.md's one paragraph or bullet that links experiments/<name>/ (where it quotes the bench)."""
    passages = [figures.words(p) for p in re.split(r"\n\s*\n|\n- ", readme("README.md"))
                if f"](experiments/{name}/)" in p]
    assert len(passages) == 1, f"README.md should have one paragraph or bullet linking experiments/{name}/"
    return passages[0]


@pytest.mark.parametrize("name", list(figures.BENCH_FIGURES))
def test_bench_figures_come_from_results_json(name):
    bullet, quoted = bench_bullet(name), figures.bench_figures()[name]
    own_text = readme(f"experiments/{name}/README.md")
    own = figures.words(own_text)
    if quoted is None:  # not measured on a quiet machine yet: no figure may be quoted
        assert f"measured by experiments/{name}/bench.py" in bullet, bullet
        assert not FIGURE.findall(bullet), f"README.md quotes figures with no results.json: {bullet}"
        quoted_cells = [c for _, rows in figures.tables(own_text) for row in rows for c in row if FIGURE.search(c)]
        assert not quoted_cells, f"experiments/{name}/README.md has a table of figures with no results.json"
    else:
        assert f"experiments/{name}/bench.py" in bullet and "results.json" in bullet, bullet
        assert quoted in bullet, f"README.md should quote, from experiments/{name}/results.json: {quoted}"
        assert quoted in own, f"experiments/{name}/README.md should quote, from its results.json: {quoted}"


def test_bench_figures_are_read_from_results_json(tmp_path, monkeypatch):
    """What the lead commits later: the figures test then reads them (a results.json as the benches write)."""
    results = {
        "cpu_vs_transformers": {"date": "2026-12-01T10:00:00+00:00", "sizes": [
            {"model": "gpt2", "params_m": 124.4, "B": 4, "T": 128,
             "ratios": {"ours/hf-fast": {"of_medians": 0.9861}, "ours-fused/hf-fast": {"of_medians": 0.9403}}}]},
        "ddp-cpu": {"scaling_efficiency": 0.8664, "setups": {
            "1 process, 1 thread": {"median_tokens_per_sec": 4101.2},
            "2 processes (torchrun), 1 thread each": {"median_tokens_per_sec": 7106.4}}},
        "startup": {"warm_cache_s": [2.47, 2.39, 2.37], "median_warm_cache_s": 2.39},
        "generation": {"rows": [{"sampling": "greedy", "generator": "ours, KV cache", "best_tokens_per_s": 40.5},
                                {"sampling": "greedy", "generator": "transformers", "best_tokens_per_s": 35.6},
                                {"sampling": "greedy", "generator": "ours, no cache", "best_tokens_per_s": 0.9}]}}
    for name, data in results.items():
        path = tmp_path / name / "results.json"
        path.parent.mkdir()
        path.write_text(json.dumps(data))
        monkeypatch.setitem(figures.RESULTS, name, path)
    assert figures.bench_figures() == {
        "cpu_vs_transformers": "ours/hf-fast with `model.loss=plain` 0.986 at gpt2 (124.4M, B=4, T=128); with "
                               "`model.loss=fused` 0.940 at gpt2 (124.4M, B=4, T=128) (medians of clean rounds, "
                               "2026-12-01)",
        "ddp-cpu": "2 processes reach 7,106 tok/s against 4,101 for one single-threaded process (86.6 % scaling "
                   "efficiency)",
        "startup": "2.39 s (median of 3)",
        "generation": "40.5 tok/s greedy with the cache (1.14x transformers' `generate`), 45x the rate without the "
                      "cache"}


# ---------------------------------------------------------------- committed reports rebuild unchanged

REPORTS = sorted(p.parent for p in (REPO / "experiments").rglob("report.md"))


def png_size(path: Path) -> tuple:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR: width, height


@pytest.mark.parametrize("folder", REPORTS, ids=[str(p.relative_to(REPO / "experiments")) for p in REPORTS])
@pytest.mark.slow
def test_a_committed_report_rebuilds_unchanged(folder, tmp_path):
    """report.md byte for byte; report.csv cell for cell but for `folder` and `run_dir` (paths relative to
    where the report is written: here --out); report.png at the same size (its pixels are matplotlib's and
    FreeType's, which may change with their versions). The report has no date of its own making: its date
    line is the runs' started_at."""
    proc = subprocess.run([sys.executable, "-m", "gpt2.report", str(folder), "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "report.md").read_text() == (folder / "report.md").read_text()
    rebuilt, committed = (pd.read_csv(d / "report.csv", keep_default_na=False) for d in (tmp_path, folder))
    paths = ["folder", "run_dir"]
    pd.testing.assert_frame_equal(rebuilt.drop(columns=paths), committed.drop(columns=paths))
    assert list(committed["folder"]) == ["."] * len(committed)  # written into the sweep folder itself
    assert list(committed["run_dir"]) == [Path(p).name for p in committed["run_dir"]]
    assert png_size(tmp_path / "report.png") == png_size(folder / "report.png")


def test_every_sweep_with_a_report_is_checked():
    names = {str(p.relative_to(REPO / "experiments")) for p in REPORTS}
    assert {"cpu-speedup", "h100-speedup/sweep", "h200-speedup/sweep"} <= names
