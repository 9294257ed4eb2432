"""The figures of README.md and experiments/*/README.md, rebuilt from the committed raw files they come from
(the run folders' summary.json and metrics.jsonl through gpt2.report, and the benches' results.json and
profile.json). tests/test_figures.py compares the READMEs' tables with these cell by cell; to see what the
READMEs must hold (e.g. after committing a new results.json):

    python tests/readme_figures.py
"""

import json
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpt2.reporting import cells  # noqa: E402
from gpt2.reporting import rules  # noqa: E402
from gpt2.reporting.build import load_runs  # noqa: E402

EXPERIMENTS = REPO / "experiments"
CPU_SWEEP, H100_SWEEP, H200_SWEEP = (EXPERIMENTS / p for p in ("cpu-speedup", "h100-speedup/sweep",
                                                                "h200-speedup/sweep"))
H100_B128 = EXPERIMENTS / "h100-speedup" / "scan" / "0_B128"
RESULTS = {name: EXPERIMENTS / name / "results.json"
           for name in ("cpu_vs_transformers", "ddp-cpu", "startup", "generation")}


# ---------------------------------------------------------------- markdown tables

def split_row(line: str) -> list:
    """The cells of a GFM table row, split at every pipe a backslash does not escape, stripped."""
    out, cell, escaped = [], "", False
    for char in line.strip().removeprefix("|").removesuffix("|"):
        if char == "|" and not escaped:
            out.append(cell.strip())
            cell = ""
        else:
            cell += char
        escaped = char == "\\" and not escaped
    return out + [cell.strip()]


def tables(markdown: str) -> list:
    """[(header, rows)] of every pipe table in the text, the alignment row left out."""
    found, block = [], []
    for line in markdown.splitlines() + [""]:
        if line.lstrip().startswith("|"):
            block.append(split_row(line))
            continue
        if len(block) >= 2 and all(re.fullmatch(r":?-+:?", c) for c in block[1]):
            found.append((block[0], block[2:]))
        block = []
    return found


def table(markdown: str, header: list) -> list:
    """The rows of the one table with exactly this header."""
    matches = [rows for head, rows in tables(markdown) if head == header]
    if len(matches) != 1:
        raise LookupError(f"{len(matches)} tables with the header | {' | '.join(header)} |")
    return matches[0]


def as_markdown(header: list, rows: list) -> str:
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header)] + rows)


def words(text: str) -> str:
    """The text with every run of white space one space: sentences wrap across lines in a README."""
    return re.sub(r"\s+", " ", text)


# ---------------------------------------------------------------- the stage tables of the sweeps

def stage_label(r, labels: dict) -> str:
    """A stage as the READMEs name it: what ran where the stage's setting was scaled (grad-accum's tokens per
    step, big-batch's B)."""
    if r["stage"] in labels:
        return labels[r["stage"]]
    return r["stage"] + (f" ({int(r['tokens_per_step']):,} tokens/step)" if r["stage"] == "grad-accum" else "") + (
        f" (B={int(r['batch_size'])})" if r["stage"] == "big-batch" else "")


def mfu_of_dtype(df):
    """MFU %, with "(of fp32)" where a row's compute dtype is not bf16 (its peak is another datasheet figure)."""
    return lambda r: f"{100 * r['mfu']:.1f}" + ("" if r["compute_dtype"] == "bf16" else f" (of {r['compute_dtype']})")


def mfu_with_peak(df):
    """MFU %, with "(dtype peak)" on the first row of each compute dtype."""
    first = {d: i for i, d in reversed(list(enumerate(df["compute_dtype"])))}
    return lambda r: f"{100 * r['mfu']:.1f}" + (f" ({r['compute_dtype']} {r['mfu_peak_tflops']:.1f})"
                                                if first[r["compute_dtype"]] == r.name else "")


def ms_of(folder: Path):
    """ms/step by stage of another sweep (the H200 table's H100 column)."""
    runs = load_runs(folder)
    other = dict(zip(runs["stage"], runs["ms_per_step"]))
    return lambda r: f"{other[r['stage']]:.1f}" if r["stage"] in other else ""


COLUMNS = {  # header -> cell of a report row
    "ms/step": lambda df: lambda r: f"{r['ms_per_step']:.1f}",
    "tok/s": lambda df: lambda r: f"{r['tokens_per_sec']:,.0f}",
    "vs baseline": lambda df: lambda r: cells.ratio(r["speedup_vs_baseline"]),
    "vs previous": lambda df: lambda r: cells.ratio(r["speedup_vs_prev"]),
    "final loss": lambda df: lambda r: f"{r['final_loss']:.3f}",
    "step IQR %": lambda df: lambda r: f"{100 * r['ms_iqr_rel']:.1f}",
    "peak reserved GiB": lambda df: lambda r: f"{r['peak_mem_reserved_gib']:.1f}",
    "seed README, H100, ms/step": lambda df: lambda r: {s: seed for s, seed, _ in rules.REFERENCE
                                                         if seed != "-"}.get(r["stage"], ""),
}


def stage_table(folder: Path, header: list, columns: dict = None, labels: dict = None, beyond_line=True) -> list:
    """The rows of a README's stage table rebuilt from a sweep's run folders (gpt2.reporting.build.load_runs):
    header[0] is the stage, the others name COLUMNS or are given in `columns` (header -> cell function
    maker); the "*beyond the seed*" line as in report.md where `beyond_line`."""
    df = load_runs(folder)
    makers = {**COLUMNS, **(columns or {})}
    cell_of = [makers[h](df) for h in header[1:]]
    rows = []
    for i, r in df.iterrows():
        if beyond_line and i and r["stage"] not in rules.SEED_STAGES and df["stage"][i - 1] in rules.SEED_STAGES:
            rows.append([rules.BEYOND_THE_SEED] + [""] * (len(header) - 1))
        rows.append([stage_label(r, labels or {})] + [cell(r) for cell in cell_of])
    return rows


def run_row(run: Path, label: str, header: list) -> list:
    """One run outside a sweep (the H100's B=128), as a stage-table row: no speed-ups, its MFU % alone."""
    r = load_runs(run).iloc[0]
    blank, mfu = (lambda df: lambda r: ""), (lambda df: lambda r: f"{100 * r['mfu']:.1f}")
    makers = {**COLUMNS, "vs baseline": blank, "vs previous": blank, "MFU % (peak of its dtype)": mfu}
    return [label] + [makers[h](None)(r) for h in header[1:]]


CPU_HEADER = ["stage", "ms/step", "tok/s", "vs baseline", "vs previous", "final loss"]
H100_HEADER = ["stage", "ms/step", "tok/s", "vs baseline", "vs previous", "MFU %", "peak reserved GiB",
               "seed README, H100, ms/step"]
CPU_EXPERIMENT_HEADER = ["stage", "ms/step", "tok/s", "vs baseline", "vs previous", "step IQR %"]
H100_EXPERIMENT_HEADER = ["stage", "ms/step", "tok/s", "vs baseline", "vs previous", "MFU % (peak of its dtype)",
                          "peak reserved GiB"]
H200_EXPERIMENT_HEADER = ["stage", "ms/step", "tok/s", "vs baseline", "vs previous", "MFU %", "peak reserved GiB",
                          "H100 ms/step"]


def sweep_tables() -> dict:
    """{(README path, header): rows} of every stage table built from a sweep."""
    fp32 = {"baseline": "baseline (fp32)"}
    h100_columns = {"MFU % (peak of its dtype)": mfu_with_peak}
    b128 = run_row(H100_B128, "big-batch at B=128 (separate run)", H100_EXPERIMENT_HEADER)
    return {
        ("README.md", tuple(CPU_HEADER)): stage_table(CPU_SWEEP, CPU_HEADER),
        ("README.md", tuple(H100_HEADER)): stage_table(H100_SWEEP, H100_HEADER, {"MFU %": mfu_of_dtype},
                                                       beyond_line=False),
        ("experiments/cpu-speedup/README.md", tuple(CPU_EXPERIMENT_HEADER)): stage_table(CPU_SWEEP,
                                                                                          CPU_EXPERIMENT_HEADER),
        ("experiments/h100-speedup/README.md", tuple(H100_EXPERIMENT_HEADER)): stage_table(
            H100_SWEEP, H100_EXPERIMENT_HEADER, h100_columns, fp32, beyond_line=False) + [b128],
        ("experiments/h200-speedup/README.md", tuple(H200_EXPERIMENT_HEADER)): stage_table(
            H200_SWEEP, H200_EXPERIMENT_HEADER, {"MFU %": mfu_of_dtype, "H100 ms/step": lambda df: ms_of(H100_SWEEP)},
            {**fp32, "cudnn-attention": "big-batch + `train.sdpa_backend=cudnn`"}, beyond_line=False),
    }


def sweep_sentences() -> dict:
    """{README path: [sentences]} that quote single figures of the sweeps."""
    h200 = load_runs(H200_SWEEP).set_index("stage")
    base, big = h200.loc["baseline"], h200.loc["big-batch"]
    b128 = load_runs(H100_B128).iloc[0]
    h100 = load_runs(H100_SWEEP).set_index("stage").loc["big-batch"]
    tokens = 19_073 * 524_288  # the FineWeb-Edu run of build-nanogpt: 19,073 steps of 2^19 tokens
    return {"README.md": [
        f"the big-batch stage measured {h100['tokens_per_sec']:,.0f} tok/s on one H100",
        f"about {tokens / h100['tokens_per_sec'] / 3600:.1f} h for the 10B tokens on one H100",
        f"the same sweep gives {base['ms_per_step']:.1f} ms for the baseline and {big['tokens_per_sec']:,.0f} tok/s "
        f"for big-batch ({big['ms_per_step']:.1f} ms per step, {100 * big['mfu']:.1f} % MFU, "
        f"{cells.ratio(big['speedup_vs_baseline'])})",
        f"A separate run at B={int(b128['batch_size'])} gave {b128['tokens_per_sec']:,.0f} tok/s "
        f"({100 * b128['mfu']:.1f} % MFU, {b128['peak_mem_reserved_gib']:.0f} GiB reserved)",
        *profile_sentences()]}


def ceiling_sentences() -> dict:
    """{README path: [sentences]} quoting the measured ceilings in each GPU folder's env.json."""
    gpu = {name: json.loads((EXPERIMENTS / name / "env.json").read_text())["gpu"]
           for name in ("h100-speedup", "h200-speedup")}
    matmul = {n: f"{g['bf16_matmul_tflops_8192']:.0f} TFLOP/s" for n, g in gpu.items()}
    copy = {n: f"{g['copy_gb_per_s_read_plus_write']:,.0f} GB/s" for n, g in gpu.items()}
    return {"experiments/h100-speedup/README.md": [
                f"8192^3 bf16 matmul {matmul['h100-speedup']}, device-to-device copy {copy['h100-speedup']}"],
            "experiments/h200-speedup/README.md": [
                f"bf16 matmul 8192^3 {matmul['h200-speedup']}, device-to-device copy {copy['h200-speedup']}"]}


# ---------------------------------------------------------------- the H200's profile and the fused-loss bench

PROFILE = EXPERIMENTS / "h200-speedup" / "extras" / "profile" / "profile.json"
FUSED_CPU = EXPERIMENTS / "fused_loss" / "cpu" / "results.json"
FUSED_H200 = EXPERIMENTS / "h200-speedup" / "extras" / "fused_loss" / "results.json"


def _profile():
    profile = json.loads(PROFILE.read_text())
    return profile, profile["by_kind_ms"], profile["kernel_ms"]


def profile_sentences() -> list:
    _, kind, total = _profile()
    share = {k: f"{100 * ms / total:.0f} %" for k, ms in kind.items()}
    return [f"puts {share['matmul']} of the GPU time in the matmuls",
            f"{share['compiled (Triton)']} in torch.compile's Triton kernels (GELU, LayerNorm backward, casts) and "
            f"{share['attention']} in attention"]


def profile_table() -> list:
    """The H200 README's table of where one step's GPU time goes (profile.json)."""
    profile, kind, total = _profile()
    attention = [k for k in profile["top_kernels"] if k["kind"] == "attention"]
    fprop, bprop = (sum(k["ms"] for k in attention if part in k["name"]) for part in ("fprop", "bprop"))
    eager = kind["reduction / elementwise (eager)"] + kind["copy / fill"] + kind["optimizer"]
    rows = [("matmuls (cuBLAS `nvjet_sm90`)", kind["matmul"]),
            ("Triton kernels from torch.compile (LayerNorm, GELU, residuals, casts, the loss)",
             kind["compiled (Triton)"]),
            (f"attention (cuDNN fprop {fprop:.0f} ms, bprop {bprop:.0f} ms, helpers "
             f"{kind['attention'] - fprop - bprop:.0f} ms)", kind["attention"]),
            ("eager reductions, copies, fused AdamW", eager)]
    return [[label, f"{ms:.1f}", f"{100 * ms / total:.1f}"] for label, ms in rows]


def sci(x: float) -> str:
    """2.3e-3, as the READMEs write a relative error."""
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _fused_rows(path: Path) -> list:
    return json.loads(path.read_text())["rows"]


def fused_cpu_table() -> list:
    return [[str(r["rows"]), r["variant"], f"{r['ms_median']:,.0f}", sci(r["rel_err_grad_x"]), sci(r["rel_err_grad_w"])]
            for r in _fused_rows(FUSED_CPU)]


def fused_gpu_table(labels: dict = None) -> list:
    return [([str(r["rows"])] if labels is None else []) + [(labels or {}).get(r["variant"], r["variant"]),
            f"{r['ms_median']:.1f}", f"{r['extra_mem_gib']:.1f}", sci(r["rel_err_grad_w"])]
            for r in _fused_rows(FUSED_H200)]


H200_FUSED_LABELS = {"plain": "plain, eager", "fused": "fused (gpt2/model/fused_loss.py), eager",
                     "plain+compile": "plain, compiled", "fused+compile": "fused, compiled (the fused-loss stage)",
                     "liger": "Liger"}


def fused_sentence() -> str:
    """README's Benchmarks line on the classifier + loss alone."""
    ms = {(r["rows"], r["variant"]): r["ms_median"] for r in _fused_rows(FUSED_CPU)}
    sizes = sorted({n for n, _ in ms})

    def span(a, b, digits):
        ratios = [ms[n, a] / ms[n, b] for n in sizes]
        return f"{min(ratios):.{digits}f}-{max(ratios):.{digits}f}x"

    gpu = {r["variant"]: r["ms_median"] for r in _fused_rows(FUSED_H200)}
    n_gpu = _fused_rows(FUSED_H200)[0]["rows"]
    return (f"on the 2-core CPU the fused head is {span('plain', 'fused', 1)} faster than the plain one eager and "
            f"{span('plain+compile', 'fused+compile', 2)} compiled (N={' and '.join(f'{n:,}' for n in sizes)}); "
            f"on an H200 at N={n_gpu:,}, compiled, plain {gpu['plain+compile']:.1f} ms and fused "
            f"{gpu['fused+compile']:.1f} ms, Liger-Kernel {gpu['liger']:.1f} ms")


GPU_TABLES = {  # (README, header) -> rows
    ("experiments/h200-speedup/README.md", ("kind", "ms per step", "% of kernel time")): profile_table,
    ("experiments/fused_loss/README.md", ("N", "variant", "ms (median of 3)", "rel. error grad x",
                                          "rel. error grad W")): fused_cpu_table,
    ("experiments/fused_loss/README.md", ("N", "variant", "ms (median of 10)", "extra memory GiB",
                                          "rel. error grad W")): fused_gpu_table,
    ("experiments/h200-speedup/README.md", ("variant", "ms (median of 10)", "extra memory GiB",
                                            "rel. error grad W vs fp32")): lambda: fused_gpu_table(H200_FUSED_LABELS),
}


# ---------------------------------------------------------------- the CPU benches' results.json

def transformers_figures(results: dict) -> str:
    """README's Benchmarks figures of experiments/cpu_vs_transformers/results.json: ours against transformers at
    its fastest (hf-fast), by the ratio of the medians over clean rounds."""
    def clause(loss):
        key = "ours/hf-fast" if loss == "plain" else "ours-fused/hf-fast"
        return ", ".join(f"{s['ratios'][key]['of_medians']:.3f} at {s['model']} ({s['params_m']:.1f}M, B={s['B']}, "
                         f"T={s['T']})" for s in results["sizes"])
    return (f"ours/hf-fast with `model.loss=plain` {clause('plain')}; with `model.loss=fused` {clause('fused')} "
            f"(medians of clean rounds, {results['date'][:10]})")


def ddp_figures(results: dict) -> str:
    setups = results["setups"]
    one, two = (setups[k]["median_tokens_per_sec"] for k in ("1 process, 1 thread",
                                                              "2 processes (torchrun), 1 thread each"))
    return (f"2 processes reach {two:,.0f} tok/s against {one:,.0f} for one single-threaded process "
            f"({100 * results['scaling_efficiency']:.1f} % scaling efficiency)")


def startup_figures(results: dict) -> str:
    warm = results["warm_cache_s"]
    assert abs(statistics.median(warm) - results["median_warm_cache_s"]) < 1e-9
    return f"{results['median_warm_cache_s']:.2f} s (median of {len(warm)})"


def generation_figures(results: dict) -> str:
    rate = {(r["sampling"], r["generator"]): r["best_tokens_per_s"] for r in results["rows"]}
    cache, theirs = rate["greedy", "ours, KV cache"], rate["greedy", "transformers"]
    text = f"{cache:.1f} tok/s greedy with the cache ({cache / theirs:.2f}x transformers' `generate`)"
    if ("greedy", "ours, no cache") in rate:
        text += f", {cache / rate['greedy', 'ours, no cache']:.0f}x the rate without the cache"
    return text


BENCH_FIGURES = {"cpu_vs_transformers": transformers_figures, "ddp-cpu": ddp_figures, "startup": startup_figures,
                 "generation": generation_figures}


def bench_figures() -> dict:
    """{bench: the figures README.md must quote, or None where its results.json is not committed yet}."""
    return {name: make(json.loads(RESULTS[name].read_text())) if RESULTS[name].is_file() else None
            for name, make in BENCH_FIGURES.items()}


if __name__ == "__main__":
    for (readme, header), rows in sweep_tables().items():
        print(f"{readme}:\n\n{as_markdown(list(header), rows)}\n")
    for (readme, header), rows in GPU_TABLES.items():
        print(f"{readme}:\n\n{as_markdown(list(header), rows())}\n")
    for readme, sentences in sweep_sentences().items():
        print(f"{readme}:\n" + "\n".join(f"  {s}" for s in sentences + [fused_sentence()]) + "\n")
    for readme, sentences in ceiling_sentences().items():
        print(f"{readme}:\n" + "\n".join(f"  {s}" for s in sentences) + "\n")
    for name, text in bench_figures().items():
        print(f"README.md, {name}: {text or '(no results.json yet: experiments/' + name + '/bench.py)'}")
