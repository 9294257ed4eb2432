"""The speed-up report: one table row per stage, read back from the runs' own summary.json files.

`build_report(folders, out_dir)` (what `python -m gpt2.report` and the sweep's end call) writes report.md,
report.csv and report.png into the first folder (or out_dir). Output is deterministic: the same runs give
byte-identical files (the date comes from the runs' `started_at`, never from the clock).

Rules a reader can check:
- Speed-ups are tok/s ratios (grad-accum changes tokens per step, so ms/step ratios would mislead), and only
  within a group of runs of the same model, device, T and world size: a folder that mixes them (e.g.
  `outputs/DATE` after a tiny run and a 124M run) gets one table per group, each against its own baseline
  (its `baseline` stage, else its first ok row); no ratio ever crosses groups. B and tokens per step are
  stage knobs (big-batch, grad-accum), so they do not split groups. A run without a device or model in its
  summary (it failed early) joins the first group it agrees with. Across folders, "Device vs device" compares
  tok/s of equal stage names.
- Noise: ms/step is the median of the steady-state steps (the last `steps_measured` step times of
  metrics.jsonl). A row is marked `noisy` when their interquartile range exceeds 10 % of that median
  (a single slow step does not move a median; a spread-out bulk does); without per-step times, when the
  summary's max/min exceeds 1.5 (both in reporting/rules.py). The header says the rule and how many rows it flagged.
- MFU against a peak measured on the machine (`mfu_peak_source: measured`, as on a CPU) is marked
  "(measured peak)" and never charted: a peak timed once under load is no yardstick.
- "adds" is the stage's own text; where the run's effective setting differs from a figure it names
  (tokens per step, micro-batch B), e.g. a CPU sweep's grad-accum shrunk by sweep.stage_overrides, the cell
  says what ran: "(ran: 16,384 tokens/step, 32 micro-steps)"; a run with train.compile_options says them:
  "(Inductor: coordinate_descent_tuning=True)".
- Evaluations: `val loss` is a run's last validation (its summary's, else metrics.jsonl's last row). Where some
  run validated more than once, `val loss (best)` (the lowest) follows; where some run ran HellaSwag, its acc_norm,
  last and best (highest); report.csv then gains EVAL_COLUMNS, and the chart a panel for each. GPT-2 124M's
  published figures (report_rules.PUBLISHED) appear only in the reference section and as labelled chart lines.
- Bad input: a summary.json that cannot be trusted (not JSON, a number past 64 bits, NaN, a string for a number)
  is one row `unreadable: <why>` with no figures (gpt2/reporting/input.py); the other rows are as ever. Names,
  errors and commands are text in report.md, never markup (report_rules.md_text: pipes, HTML, backticks).
"""

import math
import os
from pathlib import Path

import pandas as pd

from gpt2.reporting import cells
from gpt2.reporting import input as report_input
from gpt2.reporting import rules
from gpt2.errors import UsageError
from gpt2.reporting.chart import plot
from gpt2.reporting.columns import TableOptions, markdown_table
from gpt2.reporting.input import FIELDS
from gpt2.summary_schema import number_type

# report_input.FIELDS: read from summary.json, in report.csv order, each as its declared type
INTEGER = ["job"] + [f for f in FIELDS if number_type(f) is int]
NUMERIC = INTEGER + [f for f in FIELDS if number_type(f) is float]
SPEEDUPS = ["speedup_vs_baseline", "speedup_vs_prev", "baseline_stage", "prev_stage"]
CSV_COLUMNS = ["folder", "device_label", "run_dir", "job"] + FIELDS + SPEEDUPS + ["group", "ms_iqr_rel", "noisy",
                                                                     "overlapped_with"]
# appended to report.csv only when a run evaluated during training (as the table's columns), so the speed
# sweeps' files stay as they were; val_loss (final) is in FIELDS
EVAL_COLUMNS = ["val_loss_best", "val_evals", "hellaswag_acc_norm", "hellaswag_acc_norm_best", "hellaswag_evals"]
# Run facts shown once in the header when all rows agree, else as a per-row column of the table.
HEADER_FIELDS = [("device", "device"), ("torch", "torch_version"), ("CUDA", "cuda_version"), ("model", "model"),
                 ("B", "batch_size"), ("T", "seq_len"), ("world size", "world_size"), ("steps", "steps"),
                 ("steps measured", "steps_measured"), ("MFU peak TFLOP/s", "mfu_peak_tflops"),
                 ("MFU peak source", "mfu_peak_source"), ("peak memory", "peak_mem_kind")]


READ_BESIDE = ["hellaswag_acc_norm", "compile_options"]  # read for the table and the evaluations, not in report.csv


def _row(d: Path, folder: Path) -> dict:
    """The report's fields of one run folder; a run without a usable summary keeps only its stage and status."""
    job, stage = report_input.job_and_stage(d, d != folder)
    summary, problem = report_input.read_summary(d)
    if summary is None:
        summary = {"stage": stage, "status": f"unreadable: {problem}" if problem else "incomplete",
                   "error": None if problem else "no summary.json (process killed?)"}
    row = {k: summary.get(k) for k in FIELDS + READ_BESIDE}
    row["job"] = job if job is not None else summary.get("job_num")
    row["stage"] = row["stage"] or stage
    if row["status"] in (None, "running"):
        row["status"] = "incomplete"
    row["path"] = str(d.resolve())
    return row


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
    rows = [_row(d, folder) for d in candidates]
    if not rows:
        raise UsageError(f"report: no runs under {folder} (expected summary.json in it or in its sub-folders)")
    # object columns keep Python's ints exact until they become Int64 below (a float64 column would round them)
    df = pd.DataFrame(rows, columns=["job"] + FIELDS + READ_BESIDE + ["path"], dtype=object)
    df["_order"] = pd.to_numeric(df["job"], errors="coerce").fillna(math.inf)
    df = df.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)
    for col in NUMERIC + ["hellaswag_acc_norm"]:  # report_input checked every value: ints fit int64, floats
        df[col] = pd.array(list(df[col]), dtype="Int64") if col in INTEGER else pd.to_numeric(df[col])
    df = _add_evals(df)
    noise = [_noise(r) for _, r in df.iterrows()]
    df["ms_iqr_rel"] = pd.array([rel for rel, _ in noise], dtype="Float64").astype(float)
    df["noisy"] = pd.array([flag for _, flag in noise], dtype="boolean")
    return _add_overlaps(_add_speedups(_add_groups(df)))


def _add_overlaps(df: pd.DataFrame) -> pd.DataFrame:
    """`overlapped_with`: for a timed row, the rows that ran at the same time on its host and device ("; "-joined
    keys), whose load disturbed its timing (a launcher plugin that runs the stages in parallel), else ""."""
    columns = ("host", "device", "gpus", "started_at", "finished_at")
    facts = [tuple(None if cells.missing(r[c]) else str(r[c]) for c in columns) for _, r in df.iterrows()]
    found = rules.overlaps(facts)
    keys = list(df["key"])
    return df.assign(overlapped_with=["; ".join(keys[j] for j in js) if js and _measured(r) else ""
                                      for js, (_, r) in zip(found, df.iterrows())])


def _add_evals(df: pd.DataFrame) -> pd.DataFrame:
    """Final and best val loss and HellaSwag acc_norm, and how many of each metrics.jsonl holds."""
    found = [rules.run_evals(p, None if cells.missing(v) else v, None if cells.missing(h) else h)
             for p, v, h in zip(df["path"], df["val_loss"], df["hellaswag_acc_norm"])]
    return df.assign(**{c: [f[c] for f in found] if c.endswith("_evals") else
                        pd.array([f[c] for f in found], dtype="Float64").astype(float)
                        for c in EVAL_COLUMNS + ["val_loss"]})


def _evaluated(df: pd.DataFrame):
    """(show val loss (best)?, show HellaSwag?): a run validated more than once; a run has a HellaSwag figure."""
    return bool((df["val_evals"] > 1).any()), bool(df["hellaswag_acc_norm"].notna().any())


def _measured(row) -> bool:
    return bool(row["status"] not in ("failed", "incomplete") and row["tokens_per_sec"] > 0)


def _noise(row):
    """(IQR / median of the steady-state step times, noisy?) of one row; (nan, None) where nothing was timed."""
    if not (_measured(row) and row["ms_per_step"] > 0):
        return math.nan, None
    n = 0 if cells.missing(row["steps_measured"]) else int(row["steps_measured"])
    low, high = (None if cells.missing(row[c]) else float(row[c]) for c in ("ms_per_step_min", "ms_per_step_max"))
    rel, flag = rules.spread(rules.step_times(row["path"], n), n, low, high)
    return (math.nan if rel is None else rel), (None if flag is None else bool(flag))


def _add_groups(df: pd.DataFrame) -> pd.DataFrame:
    """`_group` (index), `group` (label) and `key` (stage name unique in the folder) for every row."""
    facts = [tuple(None if cells.missing(r[c]) else cells.fmt(r[c]) for _, c in rules.GROUP_FIELDS)
             for _, r in df.iterrows()]
    index, full, short = rules.groups(facts)
    seen, keys = {}, []
    for stage, label in zip(df["stage"], short):
        key = f"{stage} [{label}]" if label else stage
        seen[key] = seen.get(key, 0) + 1
        keys.append(key if seen[key] == 1 else f"{key} #{seen[key]}")  # a stage run twice: `flash #2`
    return df.assign(_group=index, group=full, key=keys)


def _add_speedups(df: pd.DataFrame) -> pd.DataFrame:
    """Speed-ups by tok/s (grad-accum changes tokens per step, so ms/step ratios would mislead), per group."""
    cols = {c: [None] * len(df) for c in SPEEDUPS}
    for g in sorted(set(df["_group"])):
        sub = df[df["_group"] == g]
        usable = (sub["status"] == "ok") & (sub["tokens_per_sec"] > 0)
        base = sub[usable & (sub["stage"] == "baseline")]
        base = base if len(base) else sub[usable]
        base = base.iloc[0] if len(base) else None
        prev = None
        for i, row in sub.iterrows():
            measured = _measured(row)
            cols["baseline_stage"][i] = base["stage"] if base is not None else None
            if measured and base is not None:
                cols["speedup_vs_baseline"][i] = row["tokens_per_sec"] / base["tokens_per_sec"]
            if measured and prev is not None:
                cols["speedup_vs_prev"][i] = row["tokens_per_sec"] / prev["tokens_per_sec"]
                cols["prev_stage"][i] = prev["stage"]
            if usable[i]:
                prev = row
    for c in SPEEDUPS:
        df[c] = pd.array(cols[c], dtype="Float64").astype(float) if c.startswith("speedup") else cols[c]
    return df


def _section(df: pd.DataFrame, title: str) -> list:
    """Header (run facts, rules, command) and the measured table(s) for the runs of one folder."""
    out, varying = [f"## {rules.md_text(title)}", ""], []
    for label, col in HEADER_FIELDS:
        vals = cells.uniques(df[col])
        if len(vals) > 1:
            varying.append((label, col))
        out.append(f"- **{label}:** " + ("varies (see table)" if len(vals) > 1 else rules.md_text(vals[0]) if vals
                                         else "n/a"))
    starts, ends = cells.uniques(df["started_at"]), cells.uniques(df["finished_at"])
    if starts:
        first, last = (rules.md_text(t) for t in (starts[0], (ends or ["n/a"])[-1]))
        out.append(f"- **date:** {rules.md_text(starts[0][:10])} (first start {first}, last finish {last})")
    groups = list(dict.fromkeys(df["group"]))
    if len(groups) == 1:
        base = df["baseline_stage"].iloc[0]
        against = ("no ok row to compare against" if cells.missing(base) else
                   f"vs baseline = against stage {rules.md_code(base)}"
                   + ("" if base == "baseline" else " (first ok stage; no ok `baseline` row)"))
    else:
        against = (f"these runs form {len(groups)} groups of different model, device, T or world size; speed-ups "
                   "are computed only within a group, each against its own `baseline` (else its first ok stage), "
                   "one table per group")
    out.append("- **speed-ups:** by tok/s (grad-accum changes tokens per step, so ms/step ratios would mislead); "
               + against)
    timed, flagged = df["noisy"].notna().sum(), [r.key for r in df.itertuples() if cells.flagged(r.noisy)]
    out.append(f"- **noise:** a row is `noisy` when the interquartile range of its steady-state step times exceeds "
               f"{rules.NOISE_IQR:.0%} of their median (column `step IQR %`; max/min above {rules.NOISE_RANGE} where "
               f"metrics.jsonl has no step times); its ms/step, tok/s and speed-ups (and, for a noisy baseline, every "
               f"vs-baseline figure) are not to be trusted: rerun on an idle machine. Flagged: "
               + (f"{len(flagged)} of {timed} timed rows ({rules.md_text(', '.join(flagged))})" if flagged else
                  f"none of {timed} timed rows"))
    overlapped = [r.key for r in df.itertuples() if r.overlapped_with]
    if overlapped:
        out.append(f"- **overlap:** {len(overlapped)} timed row(s) ({rules.md_text(', '.join(overlapped))}) ran at "
                   "the same time as "
                   "other jobs of this folder on the same host and device (column `timing not comparable`): their "
                   "ms/step, tok/s, MFU and speed-ups are not comparable with each other or with runs made alone. "
                   "Rerun one job at a time (the default launcher), or give each job its own GPU "
                   "(hydra/launcher=slurm_gpu)")
    has_mfu = df["mfu"].notna()
    sources = set(df.loc[has_mfu, "mfu_peak_source"].dropna())
    mfu_label = "MFU % (measured peak)" if sources == {"measured"} else "MFU %"
    if "measured" in sources:
        out.append("- **MFU:** " + ("" if mfu_label != "MFU %" else "cells marked (measured peak) are ")
                   + "against a peak measured on this machine (`mfu_peak_tflops` in each summary.json), not a "
                     "datasheet figure: it moves with the machine's load, compares only rows of this table, and is "
                     "not charted")
    evals = _evaluated(df)
    if any(evals):
        out.append("- **evaluations:** " + rules.evals_note(*evals))
    commands = cells.uniques(df["command"])
    if len(commands) == 1:
        out += ["", "Command:", ""] + rules.md_code_block(commands[0])
    elif commands:
        out += ["", "Commands:", ""] + [f"- {rules.md_text(r.key)}: {rules.md_code(r.command)}" for r in df.itertuples()
                                        if not cells.missing(r.command)]
    options = TableOptions(
        [(label, col, col in NUMERIC) for label, col in varying], mfu_label,
        show_error=any(cells.short_error(e) for e in df["error"]),
        # on a GPU, what the caching allocator reserved is what must fit on the card ("fits in 24 GiB")
        show_reserved=bool(df["peak_mem_reserved_gib"].notna().any()),
        best_val=evals[0], hellaswag=evals[1], show_overlap=bool(overlapped))
    for g in groups:
        out += ([""] if len(groups) == 1 else ["", f"### {rules.md_text(g)}", ""]) + [
            markdown_table(df[df["group"] == g], options)]
    return out + [""]


def _throughput(df):
    return {k: t for k, t, good in zip(df["key"], df["tokens_per_sec"], (_measured(r) for _, r in df.iterrows()))
            if good}


def _comparison(frames, labels) -> list:
    tok, keys = [_throughput(df) for df in frames], []
    for df in frames:
        keys += [k for k in df["key"] if k not in keys]
    shared = [k for k in keys if all(k in t for t in tok)]
    # the reference (denominator) is the slowest device on the first stage they all ran, so ratios read "Nx faster"
    ref = min(range(len(tok)), key=lambda i: tok[i][shared[0]]) if shared else 0
    others = [i for i in range(len(tok)) if i != ref]
    header = (["stage"] + [f"tok/s {lab}" for lab in labels] + [f"{labels[i]} / {labels[ref]}" for i in others])
    rows = []
    for key in keys:
        ratios = [tok[i][key] / tok[ref][key] if key in tok[i] and key in tok[ref] else None for i in others]
        rows.append([key] + [cells.fmt(t.get(key), "{:,.0f}") for t in tok] + [cells.ratio(x) for x in ratios])
    out = ["## Device vs device", "",
           f"tok/s per stage on each device; a ratio is tok/s on that device divided by tok/s on "
           f"{rules.md_text(labels[ref])}."]
    for i in others if shared else []:
        x = tok[i][shared[0]] / tok[ref][shared[0]]
        out.append(f"On {rules.md_code(shared[0])}, {rules.md_text(labels[i])} is {x:.1f}x faster than "
                   f"{rules.md_text(labels[ref])} (by tok/s).")
    setups = [f"model {'/'.join(cells.uniques(df['model'])) or 'n/a'}, B={'/'.join(cells.uniques(df['batch_size']))}, "
              f"T={'/'.join(cells.uniques(df['seq_len']))}" for df in frames]
    if len(set(setups)) > 1:
        out.append("Note: the folders ran different set-ups (" +
                   rules.md_text("; ".join(f"{lab}: {s}" for lab, s in zip(labels, setups))) + ").")
    right = set(header[1:])
    return out + ["", rules.md_table(header, rows, right), ""]


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
    labels = rules.device_labels([", ".join(cells.uniques(df["device"])) or "unknown device" for df in frames], folders)
    md = ["# GPT-2 speed-up report", "",
          "Measured by this project's training loop; every figure below comes from the runs' own summary.json "
          "and metrics.jsonl. ms/step is the median over steady-state steps (min-max in brackets; step IQR % is "
          "their interquartile range over that median).", ""]
    tables = []
    for df, lab, folder in zip(frames, labels, folders):
        rel = Path(os.path.relpath(folder.resolve(), out.resolve())).as_posix()
        md += _section(df, lab if len(frames) > 1 else f"Measured: {lab}")
        df = df.assign(folder=rel, device_label=lab,
                       run_dir=[Path(os.path.relpath(p, out.resolve())).as_posix() for p in df["path"]])
        tables.append(df)
    if len(frames) > 1:
        md += _comparison(frames, labels)
    evaluated = any(any(_evaluated(df)) for df in frames)
    md += rules.reference_section(evaluated)
    paths = {"md": out / "report.md", "csv": out / "report.csv", "png": out / "report.png"}
    paths["md"].write_text("\n".join(md))
    csv = pd.concat(tables, ignore_index=True)[CSV_COLUMNS + EVAL_COLUMNS * evaluated]  # evaluations: see EVAL_COLUMNS
    csv.to_csv(paths["csv"], index=False, lineterminator="\n")
    plot(frames, labels, paths["png"])
    return paths
