"""The report's chart: throughput per stage (bars), training loss against tokens seen (one panel per folder)
and, where runs evaluated during training, val loss and HellaSwag acc_norm against tokens seen (one panel each,
every folder's runs in it) with GPT-2 124M's published figures as labelled reference lines.

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

from gpt2.reporting.rules import EVAL_KEYS, PUBLISHED, PUBLISHED_NAME, eval_curves, metrics_lines

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
    for line in metrics_lines(path):
        try:
            rec = json.loads(line)
            step, loss = float(rec["step"]), float(rec["loss"])
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
            continue  # a partial last line of a killed run, a line without a train loss, or a damaged one
        if not math.isfinite(step):
            continue
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


def _plain(text) -> str:
    """Run data (stage and folder names, a status) as matplotlib text: a pair of `$` would start mathtext,
    which fails on what is not TeX ("$x{$") and would stop the report."""
    return str(text).replace("$", r"\$")


def _style(i: int, n: int) -> dict:
    """Line i of n: neighbours (likeliest to be equal) differ in width and hollow marker size, so nested
    outlines show; their markers interleave."""
    wide = (3 - i % 4) / 3
    return dict(linewidth=1 + 1.5 * wide, linestyle=STYLES[i % len(STYLES)], marker=MARKERS[i % len(MARKERS)],
                markersize=4 + 5 * wide, fillstyle="none", markevery=(0.06 * i / n, 0.06))


def _tokens_axis(ax, ends) -> None:
    """x axis of tokens seen; log scale when one run saw far more than another (grad-accum: 32x the tokens)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    log_x = bool(ends) and max(ends) > 8 * min(ends)
    ax.set_xscale("log" if log_x else "linear")
    ax.xaxis.set_major_locator(LogLocator() if log_x else MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(_tokens))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("tokens seen (steps done x tokens per step" + (", log scale)" if log_x else ")"))


def eval_series(frames, labels) -> dict:
    """{key: [(label, steps, values, tokens_per_step)]} of the evaluations worth a panel: val loss where some
    run validated more than once (a speed sweep's one final validation is no curve), HellaSwag where any ran."""
    found = {k: [] for k in EVAL_KEYS}
    for df, lab in zip(frames, labels):
        for key, run_path, tps in zip(df["key"], df["path"], df["tokens_per_step"]):
            if not _ok(tps) or tps <= 0:
                continue  # without tokens per step there is no honest x position
            for name, (steps, values) in eval_curves(run_path).items():
                found[name].append((key if len(frames) == 1 else f"{key} ({lab})", steps, values, tps))
    if not any(len(steps) > 1 for _, steps, _, _ in found["val_loss"]):
        found["val_loss"] = []
    return {k: v for k, v in found.items() if v}


def _eval_panel(ax, name: str, series: list, colour: dict) -> None:
    ends = []
    for i, (label, steps, values, tps) in enumerate(series):
        # an evaluation after step s has seen (s + 1) batches, as the loss panels count
        ax.plot([(s + 1) * tps for s in steps], values, label=_plain(label), color=colour[label],
                **_style(i, len(series)))
        ends.append((max(steps) + 1) * tps)
    _tokens_axis(ax, ends)
    ref = PUBLISHED[name]
    ax.axhline(ref, color="black", linestyle=(0, (6, 3)), linewidth=1.5, label=f"{PUBLISHED_NAME}: {ref}")
    ax.annotate(f"{PUBLISHED_NAME}: {ref} (not measured here)", (0.01, ref), xycoords=("axes fraction", "data"),
                ha="left", va="bottom", fontsize=8)
    what = "val loss" if name == "val_loss" else "HellaSwag acc_norm"
    ax.set_ylabel(what)
    ax.set_title(f"{what} against tokens seen (" + ("lower" if name == "val_loss" else "higher")
                 + " is better; dashed: published, build-nanogpt)")
    ax.legend(fontsize=8, ncol=2 if len(ax.lines) <= 12 else 3)


def figure(frames, labels):
    """The chart as a matplotlib Figure. frames: per folder, a DataFrame with key, status, tokens_per_sec,
    speedup_vs_baseline, tokens_per_step and path columns (gpt2.reporting.build.load_runs)."""
    from matplotlib.figure import Figure  # no pyplot: no display, no global state; PNG goes through Agg

    keys = []
    for df in frames:
        keys += [k for k in df["key"] if k not in keys]
    colour = dict(zip(keys, colors(len(keys))))
    folder_colour, n = colors(len(frames)), len(frames)
    evals = eval_series(frames, labels)
    e = len(evals)
    fig = Figure(figsize=(11, 4.5 + 3.8 * (n + e)), layout="tight")  # "constrained" varies in the last bits
    axes = fig.subplots(1 + n + e, 1, squeeze=False, height_ratios=[1.2] + [1] * (n + e))[:, 0]
    ax, width, heights = axes[0], 0.8 / n, []
    for k, (df, lab) in enumerate(zip(frames, labels)):
        ok = ~df["status"].isin(["failed", "incomplete"]) & (df["tokens_per_sec"] > 0).fillna(False)
        tok = {key: t for key, t, good in zip(df["key"], df["tokens_per_sec"], ok) if good}
        speed, status = dict(zip(df["key"], df["speedup_vs_baseline"])), dict(zip(df["key"], df["status"]))
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(keys))]
        have = [(x, key) for x, key in zip(xs, keys) if key in tok]
        ax.bar([x for x, _ in have], [tok[key] for _, key in have], width, label=_plain(lab),
               color=[colour[key] for _, key in have] if n == 1 else folder_colour[k])
        heights += [tok[key] for _, key in have]
        for x, key in zip(xs, keys):
            if key in tok and n == 1 and _ok(speed.get(key)):
                ax.annotate(f"{speed[key]:.2f}x", (x, tok[key]), ha="center", va="bottom", fontsize=8)
            elif key in status and key not in tok:
                # "unreadable: <why>" would cross the panel: the why is in report.md
                ax.annotate(_plain(str(status[key]).split(":")[0]), (x, 0), xycoords=("data", "axes fraction"),
                            ha="center", va="bottom", fontsize=8, rotation=90, color="red")
    ax.set_xticks(range(len(keys)), [_plain(k) for k in keys], rotation=25, ha="right")
    ax.set_ylabel("tokens / s")
    ax.set_title("Throughput per stage (higher is better" + ("; labels: speed-up vs baseline)" if n == 1 else ")"))
    if heights and max(heights) / max(min(heights), 1e-9) > 20:
        ax.set_yscale("log")
    if n > 1:
        ax.legend(fontsize=8)
    for ax, df, lab in zip(axes[1:1 + n], frames, labels):
        ends = []
        for i, (key, run_path, tps) in enumerate(zip(df["key"], df["path"], df["tokens_per_step"])):
            steps, losses = loss_curve(run_path)
            if not steps or not _ok(tps) or tps <= 0:
                continue  # without tokens per step there is no honest x position
            # the loss of step s is measured on its batch: (s + 1) batches seen; markers of equal curves interleave
            ax.plot([(s + 1) * tps for s in steps], losses, label=_plain(key), color=colour[key],
                    **_style(i, len(df)))
            ends.append((max(steps) + 1) * tps)
        _tokens_axis(ax, ends)
        ax.set_ylabel("train loss")
        ax.set_title(f"Training loss per stage: {_plain(lab)}")
        if ax.lines:
            ax.legend(fontsize=8, ncol=2 if len(ax.lines) <= 12 else 3)
    names = list(dict.fromkeys(label for series in evals.values() for label, *_ in series))
    run_colour = {k: colour[k] for k in names} if n == 1 else dict(zip(names, colors(len(names))))
    for ax, (name, series) in zip(axes[1 + n:], evals.items()):
        _eval_panel(ax, name, series, run_colour)
    return fig


def plot(frames, labels, path: Path) -> None:
    figure(frames, labels).savefig(path, dpi=100, metadata={"Software": None})
