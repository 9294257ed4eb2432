"""The speed-up report: one table row per stage, read back from the runs' own summary.json files.

    python -m gpt2.report multirun/2026-11-25/10-00-00 [more folders] [--out DIR]

writes report.md, report.csv and report.png into the first folder (or --out). The sweep's
end-of-multirun hook calls `build_report` directly. Output is deterministic: the same runs give
byte-identical files (the date comes from the runs' `started_at`, never from the clock).
"""

import argparse
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

import pandas as pd

from gpt2.errors import UsageError

log = logging.getLogger(__name__)

# Published figures (DESIGN.md), never mixed with measured columns.
REFERENCE = [  # stage, seed README on H100 (ms/step), build-nanogpt video on A100 (ms/step)
    ("baseline", "~400", "~1000"), ("tf32", "~200", "~333"), ("bf16", "~180", "~300"),
    ("(torch.compile)", "-", "~130"), ("flash", "~88", "~96"), ("nice-vocab", "~58", "~93"),
    ("gpt3-optim (fused AdamW)", "-", "~90"),
]
FIELDS = ["stage", "adds", "status", "error", "device", "device_type", "torch_version", "cuda_version", "model",
          "batch_size", "seq_len", "world_size", "grad_accum_steps", "tokens_per_step", "steps", "steps_measured",
          "ms_per_step", "ms_per_step_min", "ms_per_step_max", "tokens_per_sec", "mfu", "mfu_peak_tflops",
          "mfu_peak_source", "compute_dtype", "peak_mem_gib", "peak_mem_reserved_gib", "device_mem_gib", "peak_mem_kind", "final_loss", "val_loss",
          "started_at", "finished_at", "command"]  # read from summary.json, in report.csv order
INTEGER = ["job", "batch_size", "seq_len", "world_size", "grad_accum_steps", "tokens_per_step", "steps",
           "steps_measured"]
NUMERIC = INTEGER + ["ms_per_step", "ms_per_step_min", "ms_per_step_max", "tokens_per_sec", "mfu",
                     "mfu_peak_tflops", "peak_mem_gib", "peak_mem_reserved_gib", "device_mem_gib", "final_loss",
                     "val_loss"]
SPEEDUPS = ["speedup_vs_baseline", "speedup_vs_prev", "baseline_stage", "prev_stage"]
CSV_COLUMNS = ["folder", "device_label", "run_dir", "job"] + FIELDS + SPEEDUPS
# Run facts shown once in the header when all rows agree, else as a per-row column of the table.
HEADER_FIELDS = [("device", "device"), ("torch", "torch_version"), ("CUDA", "cuda_version"), ("model", "model"),
                 ("B", "batch_size"), ("T", "seq_len"), ("world size", "world_size"), ("steps", "steps"),
                 ("steps measured", "steps_measured"), ("MFU peak TFLOP/s", "mfu_peak_tflops"),
                 ("MFU peak source", "mfu_peak_source"), ("peak memory", "peak_mem_kind")]


def _read_summary(run_dir: Path):
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError) as e:
        log.warning("%s: no readable summary.json (%s); shown as incomplete", run_dir, e.__class__.__name__)
        return None
    if not isinstance(summary, dict):
        log.warning("%s: summary.json holds a %s, not a run's summary; shown as incomplete", run_dir,
                    type(summary).__name__)
        return None
    return summary


def load_runs(folder) -> pd.DataFrame:
    """One row per run in `folder` (a single run folder, or a sweep of job sub-folders), in stage order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"report: folder not found: {folder}")
    if (folder / "summary.json").is_file():
        candidates = [folder]
    else:  # a sweep: job folders hold summary.json, or at least Hydra's files if the process was killed
        candidates = [d for d in sorted(folder.iterdir()) if d.is_dir() and any(
            (d / f).exists() for f in ("summary.json", "metrics.jsonl", ".hydra"))]
    rows = []
    for d in candidates:
        m = re.match(r"^(\d+)_(.+)$", d.name) if d != folder else None  # Hydra job folder: <num>_<stage>
        job, stage = (int(m.group(1)), m.group(2)) if m else (None, d.name)
        summary = _read_summary(d) or {"stage": stage, "status": "incomplete",
                                       "error": "no summary.json (process killed?)"}
        row = {k: summary.get(k) for k in FIELDS}
        row["job"] = job if job is not None else summary.get("job_num")
        row["stage"] = row["stage"] or stage
        if row["status"] in (None, "running"):
            row["status"] = "incomplete"
        row["path"] = str(d.resolve())
        rows.append(row)
    if not rows:
        raise UsageError(f"report: no runs under {folder} (expected summary.json in it or in its sub-folders)")
    df = pd.DataFrame(rows, columns=["job"] + FIELDS + ["path"])
    df["_order"] = pd.to_numeric(df["job"], errors="coerce").fillna(math.inf)
    df = df.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)
    for col in NUMERIC:
        df[col] = pd.to_numeric(df[col], errors="coerce")
        df[col] = df[col].round().astype("Int64") if col in INTEGER else df[col]
    return _add_speedups(df)


def _add_speedups(df: pd.DataFrame) -> pd.DataFrame:
    """Speed-ups by tok/s (grad-accum changes tokens per step, so ms/step ratios would mislead)."""
    usable = (df["status"] == "ok") & (df["tokens_per_sec"] > 0)
    base = df[usable & (df["stage"] == "baseline")]
    base = base if len(base) else df[usable]
    base = base.iloc[0] if len(base) else None
    vs_base, vs_prev, prev_names, prev = [], [], [], None
    for i, row in df.iterrows():
        measured = row["status"] not in ("failed", "incomplete") and row["tokens_per_sec"] > 0
        vs_base.append(row["tokens_per_sec"] / base["tokens_per_sec"] if measured and base is not None else None)
        vs_prev.append(row["tokens_per_sec"] / prev["tokens_per_sec"] if measured and prev is not None else None)
        prev_names.append(prev["stage"] if measured and prev is not None else None)
        if usable[i]:
            prev = row
    df["speedup_vs_baseline"] = pd.array(vs_base, dtype="Float64").astype(float)
    df["speedup_vs_prev"] = pd.array(vs_prev, dtype="Float64").astype(float)
    df["baseline_stage"] = base["stage"] if base is not None else None
    df["prev_stage"] = prev_names
    return df


# ---------------------------------------------------------------- formatting

def _missing(v) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def _fmt(v, spec="{}"):
    if _missing(v):
        return ""
    return f"{v:.4g}" if spec == "{}" and isinstance(v, float) else spec.format(v)


def _short_error(err) -> str:
    lines = [ln.strip() for ln in ("" if _missing(err) else str(err)).splitlines() if ln.strip()]
    if not lines:
        return ""
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    return line if len(line) <= 120 else line[:117] + "..."


def _md_table(header, rows, right=()) -> str:
    def cell(s):
        return str(s).replace("|", "\\|").replace("\n", " ")
    out = ["| " + " | ".join(cell(h) for h in header) + " |",
           "| " + " | ".join("---:" if h in right else "---" for h in header) + " |"]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _uniques(series):
    return sorted({_fmt(v) for v in series if not _missing(v)})


def _ratio(x) -> str:
    return "" if _missing(x) else f"{x:.2f}x" if x >= 0.1 else f"{x:.2g}x"


def _ms_cell(r):
    ms = _fmt(r["ms_per_step"], "{:.1f}")
    if ms and not _missing(r["ms_per_step_min"]) and not _missing(r["ms_per_step_max"]):
        ms += f" ({r['ms_per_step_min']:.1f}-{r['ms_per_step_max']:.1f})"
    return ms


def _mem_cell(v):
    return "" if _missing(v) else (f"{v:.1f}" if v >= 1 else f"{v:.3g}")


def _section(df: pd.DataFrame, title: str) -> list:
    """Header (run facts, command) and the measured table for the runs of one folder."""
    out, varying = [f"## {title}", ""], []
    for label, col in HEADER_FIELDS:
        vals = _uniques(df[col])
        if len(vals) > 1:
            varying.append((label, col))
        out.append(f"- **{label}:** " + ("varies (see table)" if len(vals) > 1 else vals[0] if vals else "n/a"))
    starts, ends = _uniques(df["started_at"]), _uniques(df["finished_at"])
    if starts:
        out.append(f"- **date:** {starts[0][:10]} (first start {starts[0]}, last finish {(ends or ['n/a'])[-1]})")
    base = df["baseline_stage"].iloc[0]
    against = ("no ok row to compare against" if _missing(base) else f"vs baseline = against stage `{base}`"
               + ("" if base == "baseline" else " (first ok stage; no ok `baseline` row)"))
    out.append("- **speed-ups:** by tok/s (grad-accum changes tokens per step, so ms/step ratios would mislead); "
               + against)
    commands = _uniques(df["command"])
    if len(commands) == 1:
        out += ["", "Command:", "", "```", commands[0], "```"]
    elif commands:
        out += ["", "Commands:", ""] + [f"- {r.stage}: `{r.command}`" for r in df.itertuples()
                                        if not _missing(r.command)]
    show_error = any(_short_error(e) for e in df["error"])
    # on a GPU, what the caching allocator reserved is what must fit on the card ("fits in 24 GiB")
    show_reserved = df["peak_mem_reserved_gib"].notna().any()
    header = (["job", "stage", "adds"] + [label for label, _ in varying] +
              ["tokens/step", "ms/step (min-max)", "tok/s", "vs baseline", "vs previous", "MFU %",
               "peak mem GiB"] + (["peak reserved GiB"] if show_reserved else []) +
              ["final loss", "val loss", "status"] + (["error"] if show_error else []))
    rows = []
    for i, r in df.iterrows():
        prev = _ratio(r["speedup_vs_prev"])
        if prev and (i == 0 or df["stage"].iloc[i - 1] != r["prev_stage"]):
            prev += f" (vs {r['prev_stage']})"  # the row above failed: compare with the last ok one
        rows.append([_fmt(r["job"]), r["stage"], _fmt(r["adds"])] + [_fmt(r[c]) for _, c in varying] +
                    [_fmt(r["tokens_per_step"], "{:,}"), _ms_cell(r), _fmt(r["tokens_per_sec"], "{:,.0f}"),
                     _ratio(r["speedup_vs_baseline"]), prev, _fmt(r["mfu"], "{:.1%}")[:-1],
                     _mem_cell(r["peak_mem_gib"])] + ([_mem_cell(r["peak_mem_reserved_gib"])] if show_reserved else []) +
                    [_fmt(r["final_loss"], "{:.3f}"),
                     _fmt(r["val_loss"], "{:.3f}"), r["status"]] + ([_short_error(r["error"])] if show_error else []))
    right = {"job", "tokens/step", "tok/s", "vs baseline", "MFU %", "peak mem GiB", "peak reserved GiB", "final loss",
             "val loss"} | {
        label for label, col in varying if col in NUMERIC}
    return out + ["", _md_table(header, rows, right), ""]


def _stage_keys(df: pd.DataFrame) -> list:
    """Stage names made unique within one folder (a stage run twice becomes `flash #2`)."""
    seen, keys = {}, []
    for s in df["stage"]:
        seen[s] = seen.get(s, 0) + 1
        keys.append(s if seen[s] == 1 else f"{s} #{seen[s]}")
    return keys


def _all_keys(frames) -> list:
    keys = []
    for df in frames:
        keys += [k for k in _stage_keys(df) if k not in keys]
    return keys


def _throughput(df):
    ok = ~df["status"].isin(["failed", "incomplete"])
    return {k: t for k, t, good in zip(_stage_keys(df), df["tokens_per_sec"], ok) if good and not _missing(t)}


def _comparison(frames, labels) -> list:
    tok, keys = [_throughput(df) for df in frames], _all_keys(frames)
    shared = [k for k in keys if all(k in t for t in tok)]
    # the reference (denominator) is the slowest device on the first stage they all ran, so ratios read "Nx faster"
    ref = min(range(len(tok)), key=lambda i: tok[i][shared[0]]) if shared else 0
    others = [i for i in range(len(tok)) if i != ref]
    header = (["stage"] + [f"tok/s {lab}" for lab in labels] + [f"{labels[i]} / {labels[ref]}" for i in others])
    rows = []
    for key in keys:
        ratios = [tok[i][key] / tok[ref][key] if key in tok[i] and key in tok[ref] else None for i in others]
        rows.append([key] + [_fmt(t.get(key), "{:,.0f}") for t in tok] + [_ratio(x) for x in ratios])
    out = ["## Device vs device", "",
           f"tok/s per stage on each device; a ratio is tok/s on that device divided by tok/s on {labels[ref]}."]
    for i in others if shared else []:
        x = tok[i][shared[0]] / tok[ref][shared[0]]
        out.append(f"On `{shared[0]}`, {labels[i]} is {x:.1f}x faster than {labels[ref]} (by tok/s).")
    setups = [f"model {'/'.join(_uniques(df['model'])) or 'n/a'}, B={'/'.join(_uniques(df['batch_size']))}, "
              f"T={'/'.join(_uniques(df['seq_len']))}" for df in frames]
    if len(set(setups)) > 1:
        out.append("Note: the folders ran different set-ups (" +
                   "; ".join(f"{lab}: {s}" for lab, s in zip(labels, setups)) + ").")
    right = set(header[1:])
    return out + ["", _md_table(header, rows, right), ""]


def _reference() -> list:
    header = ["stage", "seed README, H100, ms/step (B=16, T=1024, read off screenshots)",
              "build-nanogpt video, A100, ms/step (B=16, T=1024)"]
    return ["## Published reference figures (not measured here)", "",
            "These are published figures, not measured here: the seed repository's README (H100, read off its "
            "screenshots) and Karpathy's build-nanogpt video (A100). Compare them with the measured tables "
            "above only as orientation.", "", _md_table(header, REFERENCE), ""]


def _device_labels(frames, folders) -> list:
    devices = [", ".join(_uniques(df["device"])) or "unknown device" for df in frames]
    parts = [Path(f).resolve().parts for f in folders]
    labels = list(devices)
    for i, dev in enumerate(devices):
        same = [j for j, other in enumerate(devices) if other == dev]
        if len(same) > 1:
            n = 1  # shortest path suffix that tells the folders apart
            while n < len(parts[i]) and len({parts[j][-n:] for j in same}) < len(same):
                n += 1
            labels[i] = f"{dev} ({'/'.join(parts[i][-n:])})"
    return labels


# ---------------------------------------------------------------- chart

def _loss_curve(path: str):
    steps, losses = [], []
    try:
        lines = (Path(path) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return steps, losses
    for line in lines:
        try:
            rec = json.loads(line)
            step, loss = float(rec["step"]), float(rec["loss"])
        except (ValueError, KeyError, TypeError):
            continue  # a partial last line of a killed run, or a line without a train loss
        steps.append(step)
        losses.append(loss if math.isfinite(loss) else math.nan)
    return steps, losses


def _plot(frames, labels, path: Path):
    from matplotlib.figure import Figure  # no pyplot: no display, no global state; PNG goes through Agg

    keys, n = _all_keys(frames), len(frames)
    colors = {k: f"C{i % 10}" for i, k in enumerate(keys)}
    fig = Figure(figsize=(11, 4.5 + 3.8 * n), layout="tight")  # "constrained" varies in the last bits
    axes = fig.subplots(1 + n, 1, squeeze=False, height_ratios=[1.2] + [1] * n)[:, 0]
    ax, width, heights = axes[0], 0.8 / n, []
    for k, (df, lab) in enumerate(zip(frames, labels)):
        tok, speed = _throughput(df), dict(zip(_stage_keys(df), df["speedup_vs_baseline"]))
        status = dict(zip(_stage_keys(df), df["status"]))
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(keys))]
        have = [(x, key) for x, key in zip(xs, keys) if key in tok]
        ax.bar([x for x, _ in have], [tok[key] for _, key in have], width, label=lab,
               color=[colors[key] for _, key in have] if n == 1 else f"C{k}")
        heights += [tok[key] for _, key in have]
        for x, key in zip(xs, keys):
            if key in tok and n == 1 and not _missing(speed.get(key)):
                ax.annotate(f"{speed[key]:.2f}x", (x, tok[key]), ha="center", va="bottom", fontsize=8)
            elif key in status and key not in tok:
                ax.annotate(status[key], (x, 0), xycoords=("data", "axes fraction"), ha="center", va="bottom",
                            fontsize=8, rotation=90, color="red")
    ax.set_xticks(range(len(keys)), keys, rotation=25, ha="right")
    ax.set_ylabel("tokens / s")
    ax.set_title("Throughput per stage (higher is better" + ("; labels: speed-up vs baseline)" if n == 1 else ")"))
    if heights and max(heights) / max(min(heights), 1e-9) > 20:
        ax.set_yscale("log")
    if n > 1:
        ax.legend(fontsize=8)
    for ax, df, lab in zip(axes[1:], frames, labels):
        for key, run_path in zip(_stage_keys(df), df["path"]):
            steps, losses = _loss_curve(run_path)
            if steps:
                ax.plot(steps, losses, label=key, color=colors[key], linewidth=1.2)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("train loss")
        ax.set_title(f"Training loss per stage: {lab}")
        if ax.lines:
            ax.legend(fontsize=8, ncol=2)
    fig.savefig(path, dpi=100, metadata={"Software": None})


# ---------------------------------------------------------------- entry points

def build_report(folders: list, out_dir=None) -> dict:
    """Write report.md, report.csv and report.png into out_dir (default: the first folder); return their paths."""
    if not folders:
        raise UsageError("report: no folder given")
    folders = [Path(f) for f in folders]
    frames = [load_runs(f) for f in folders]
    out = Path(out_dir) if out_dir is not None else folders[0]
    if out.exists() and not out.is_dir():
        raise UsageError(f"report: --out {out} is a file, not a folder; give a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"report: cannot create --out {out} ({e.strerror}); give a folder you can write to") from None
    labels = _device_labels(frames, folders)
    md = ["# GPT-2 speed-up report", "",
          "Measured by this project's training loop; every figure below comes from the runs' own summary.json "
          "and metrics.jsonl. ms/step is the median over steady-state steps (min-max in brackets).", ""]
    tables = []
    for df, lab, folder in zip(frames, labels, folders):
        rel = Path(os.path.relpath(folder.resolve(), out.resolve())).as_posix()
        md += _section(df, lab if len(frames) > 1 else f"Measured: {lab}")
        df = df.assign(folder=rel, device_label=lab,
                       run_dir=[Path(os.path.relpath(p, out.resolve())).as_posix() for p in df["path"]])
        tables.append(df[CSV_COLUMNS])
    if len(frames) > 1:
        md += _comparison(frames, labels)
    md += _reference()
    paths = {"md": out / "report.md", "csv": out / "report.csv", "png": out / "report.png"}
    paths["md"].write_text("\n".join(md))
    pd.concat(tables, ignore_index=True).to_csv(paths["csv"], index=False, lineterminator="\n")
    _plot(frames, labels, paths["png"])
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2.report", description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", metavar="DIR", help="a sweep folder or a single run folder")
    parser.add_argument("--out", metavar="DIR", help="where to write the report (default: the first DIR)")
    args = parser.parse_args(argv)
    try:
        paths = build_report(args.folders, args.out)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    for p in paths.values():
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
