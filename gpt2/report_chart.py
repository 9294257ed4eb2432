"""The report's chart: throughput per stage (bars) and training loss against tokens seen (one panel per folder).

Curves of stages that learn the same thing (tf32, bf16 and flash give the same losses) lie on top of each
other, so each curve has its own line style, width and hollow marker shape and size, its markers at their own
offsets; colours come from tab20 (tab10's
ten first, then their light twins) and, past 20 runs, from a continuous colormap, so no two runs share one.
MFU is never charted: against a peak measured under load it is not a figure to compare by eye.
"""

import json
import math
from pathlib import Path

import pandas as pd

STYLES = ["-", "--", "-.", ":"]
MARKERS = ["o", "s", "^", "v", "D", "P", "X", "*", "<", ">"]


def colors(n: int) -> list:
    """n distinct RGBA colours, the first ten tab10's."""
    from matplotlib import colormaps

    if n <= 20:
        tab = colormaps["tab20"].colors
        return [tuple(tab[i]) + (1.0,) for i in (list(range(0, 20, 2)) + list(range(1, 20, 2)))[:n]]
    return [tuple(colormaps["turbo"](0.05 + 0.9 * i / (n - 1))) for i in range(n)]


def loss_curve(path: str):
    """(steps, losses) of the train-loss records in a run's metrics.jsonl."""
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


def _tokens(x, _pos=None) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.4g}{suffix}"
    return f"{x:.0f}"


def _ok(v) -> bool:
    return not pd.isna(v)


def figure(frames, labels):
    """The chart as a matplotlib Figure. frames: per folder, a DataFrame with key, status, tokens_per_sec,
    speedup_vs_baseline, tokens_per_step and path columns (gpt2.report.load_runs)."""
    from matplotlib.figure import Figure  # no pyplot: no display, no global state; PNG goes through Agg
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    keys = []
    for df in frames:
        keys += [k for k in df["key"] if k not in keys]
    colour = dict(zip(keys, colors(len(keys))))
    folder_colour, n = colors(len(frames)), len(frames)
    fig = Figure(figsize=(11, 4.5 + 3.8 * n), layout="tight")  # "constrained" varies in the last bits
    axes = fig.subplots(1 + n, 1, squeeze=False, height_ratios=[1.2] + [1] * n)[:, 0]
    ax, width, heights = axes[0], 0.8 / n, []
    for k, (df, lab) in enumerate(zip(frames, labels)):
        ok = ~df["status"].isin(["failed", "incomplete"]) & (df["tokens_per_sec"] > 0).fillna(False)
        tok = {key: t for key, t, good in zip(df["key"], df["tokens_per_sec"], ok) if good}
        speed, status = dict(zip(df["key"], df["speedup_vs_baseline"])), dict(zip(df["key"], df["status"]))
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(keys))]
        have = [(x, key) for x, key in zip(xs, keys) if key in tok]
        ax.bar([x for x, _ in have], [tok[key] for _, key in have], width, label=lab,
               color=[colour[key] for _, key in have] if n == 1 else folder_colour[k])
        heights += [tok[key] for _, key in have]
        for x, key in zip(xs, keys):
            if key in tok and n == 1 and _ok(speed.get(key)):
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
        ends = []
        for i, (key, run_path, tps) in enumerate(zip(df["key"], df["path"], df["tokens_per_step"])):
            steps, losses = loss_curve(run_path)
            if not steps or not _ok(tps) or tps <= 0:
                continue  # without tokens per step there is no honest x position
            # the loss of step s is measured on its batch: (s + 1) batches seen; markers of equal curves interleave
            # neighbours (likeliest to be equal) differ in width and hollow marker size: nested outlines show
            wide = (3 - i % 4) / 3
            ax.plot([(s + 1) * tps for s in steps], losses, label=key, color=colour[key], linewidth=1 + 1.5 * wide,
                    linestyle=STYLES[i % len(STYLES)], marker=MARKERS[i % len(MARKERS)], markersize=4 + 5 * wide,
                    fillstyle="none", markevery=(0.06 * i / len(df), 0.06))
            ends.append((max(steps) + 1) * tps)
        log_x = bool(ends) and max(ends) > 8 * min(ends)  # grad-accum sees 32x the tokens: linear hides the rest
        ax.set_xscale("log" if log_x else "linear")
        ax.xaxis.set_major_locator(LogLocator() if log_x else MaxNLocator(integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(_tokens))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("tokens seen (steps done x tokens per step" + (", log scale)" if log_x else ")"))
        ax.set_ylabel("train loss")
        ax.set_title(f"Training loss per stage: {lab}")
        if ax.lines:
            ax.legend(fontsize=8, ncol=2 if len(ax.lines) <= 12 else 3)
    return fig


def plot(frames, labels, path: Path) -> None:
    figure(frames, labels).savefig(path, dpi=100, metadata={"Software": None})
