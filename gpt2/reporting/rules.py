"""The report's judgement calls, kept apart so each is one small function to read and test: when a row's
timing is noisy, which runs may be compared, what a stage's "adds" text must say about what really ran, and
which evaluations a run made. The rules are stated in build.py's docstring; the report's header repeats
them. The published figures the report shows (never mixed with measured ones) are here too, in one place."""

import json
import math
import re
import statistics
from pathlib import Path

import pandas as pd

NOISE_IQR = 0.10  # interquartile range of the steady-state step times above 10 % of their median: noisy
NOISE_RANGE = 1.5  # max/min of the summary above this: noisy (only where metrics.jsonl has no step times)
GROUP_FIELDS = [("model", "model"), ("device", "device"), ("T", "seq_len"), ("world size", "world_size")]

EVAL_KEYS = ("val_loss", "hellaswag_acc_norm")  # the evaluation rows of metrics.jsonl: {"step": s, key: value, ...}


def metrics_lines(path) -> list:
    """The lines of a run's metrics.jsonl; none where it is missing or not text (a damaged file: the report
    goes on without its curves and step times)."""
    try:
        return (Path(path) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []


def step_times(path, n: int) -> list:
    """The last n step times (ms) in a run's metrics.jsonl: the steady-state steps its summary's median is of
    (the first `steps - steps_measured` are warm-up; a resumed run appends, its last steps are this process's)."""
    times = []
    for line in metrics_lines(path):
        try:
            times.append(float(json.loads(line)["ms"]))
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
            continue  # a validation line, a partial last line of a killed run, or a damaged one
    return times[-n:] if n > 0 else []


def eval_curves(path) -> dict:
    """{key: (steps, values)} for each of EVAL_KEYS found in a run's metrics.jsonl, sorted by step; a step
    evaluated twice (a resumed run appends to the file) keeps its last value."""
    found = {}
    for line in metrics_lines(path):
        try:
            rec = json.loads(line)
            key = next((k for k in EVAL_KEYS if k in rec), None)
            if key is not None and "loss" not in rec:
                value = float(rec[key])
                found.setdefault(key, {})[int(rec["step"])] = value if math.isfinite(value) else math.nan
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError):
            continue  # a partial last line of a killed run, or a damaged one
    return {k: tuple(zip(*sorted(v.items()))) for k, v in found.items()}


def run_evals(path, val_loss=None, hellaswag=None) -> dict:
    """A run's final val loss and HellaSwag acc_norm (its summary's, else its last evaluation row's), the best of
    each (lowest loss, highest acc_norm) and how many evaluation rows its metrics.jsonl holds."""
    curves, out = eval_curves(path), {}
    for key, final, best in (("val_loss", val_loss, min), ("hellaswag_acc_norm", hellaswag, max)):
        steps, values = curves.get(key, ((), ()))
        values = [v for v in values if not math.isnan(v)]
        final = values[-1] if final is None and values else final
        seen = values + ([] if final is None else [float(final)])
        out.update({key: final, f"{key}_best": best(seen) if seen else None, f"{key.split('_')[0]}_evals": len(steps)})
    return out


def evals_note(best_val: bool, hellaswag: bool) -> str:
    """The report header's line on its evaluation columns and the published figures they aim at."""
    said = [("`val loss (best)` is the lowest of the run's validations (`val loss`: its last)", best_val),
            ("HellaSwag acc_norm is the last evaluation's (best: the highest)", hellaswag)]
    return ("; ".join(text for text, shown in said if shown) + f"; {PUBLISHED_NAME}, not measured here: val loss "
            f"{PUBLISHED['val_loss']} on FineWeb-Edu val, HellaSwag acc_norm {PUBLISHED['hellaswag_acc_norm']} "
            "(build-nanogpt; see the reference figures below)")


def device_labels(devices: list, folders: list) -> list:
    """Each folder's device name; folders of the same device are told apart by the shortest path suffix."""
    parts = [Path(f).resolve().parts for f in folders]
    labels = list(devices)
    for i, dev in enumerate(devices):
        same = [j for j, other in enumerate(devices) if other == dev]
        if len(same) > 1:
            n = 1
            while n < len(parts[i]) and len({parts[j][-n:] for j in same}) < len(same):
                n += 1
            labels[i] = f"{dev} ({'/'.join(parts[i][-n:])})"
    return labels


def spread(times: list, n: int, low, high):
    """(IQR / median or None, noisy: bool or None) from the n steady-state step times, else from min and max."""
    if len(times) >= 2 and len(times) == n:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
        rel = (q3 - q1) / statistics.median(times)
        return rel, rel > NOISE_IQR
    if low is None or high is None or not low > 0:
        return None, None
    return None, high / low > NOISE_RANGE


def groups(facts: list):
    """Group index, full label and short label (only what differs between groups) for each row's GROUP_FIELDS
    values (None where unknown). A row with unknowns (a run that failed before its device was known) joins the
    first group that agrees on what is known."""
    found = []
    for f in facts:
        if None not in f and f not in found:
            found.append(f)
    index = []
    for f in facts:
        i = next((i for i, g in enumerate(found) if all(a is None or a == b for a, b in zip(f, g))), None)
        if i is None:
            found.append(f)
            i = len(found) - 1
        index.append(i)
    varying = [j for j in range(len(GROUP_FIELDS)) if len({g[j] for g in found}) > 1]
    full = [", ".join(f"{name}={v or 'n/a'}" for (name, _), v in zip(GROUP_FIELDS, g)) for g in found]
    short = [", ".join(f"{GROUP_FIELDS[j][0]}={g[j] or 'n/a'}" for j in varying) for g in found]
    return index, [full[i] for i in index], [short[i] for i in index]


def adds_ran(adds: str, tokens_per_step, grad_accum, world_size, batch_size) -> str:
    """What ran, where it differs from a figure the stage's text names (tokens, B=); '' if nothing does."""
    ran = []
    claimed = re.search(r"(\d{1,3}(?:,\d{3})+|\d+) tokens", adds)
    if claimed and tokens_per_step is not None and int(claimed.group(1).replace(",", "")) != tokens_per_step:
        ran.append(f"{tokens_per_step:,} tokens/step" + ("" if grad_accum is None else f", {grad_accum} micro-steps")
                   + ("" if world_size in (None, 1) else f" x {world_size} ranks"))
    claimed = re.search(r"\bB=(\d+)", adds)
    if claimed and batch_size is not None and int(claimed.group(1)) != batch_size:
        ran.append(f"B={batch_size}")
    return f"(ran: {'; '.join(ran)})" if ran else ""


# ---------------------------------------------------------------- published figures, never mixed with measured ones

# the seed's seven stages (conf/sweep/speedup.yaml): the table marks where the stages beyond them begin
SEED_STAGES = ("baseline", "tf32", "bf16", "flash", "nice-vocab", "gpt3-optim", "grad-accum")
BEYOND_THE_SEED = "*beyond the seed*"

REFERENCE = [  # stage, seed README on H100 (ms/step), build-nanogpt video on A100 (ms/step); see DESIGN.md
    ("baseline", "~400", "~1000"), ("tf32", "~200", "~333"), ("bf16", "~180", "~300"),
    ("(torch.compile)", "-", "~130"), ("flash", "~88", "~96"), ("nice-vocab", "~58", "~93"),
    ("gpt3-optim (fused AdamW)", "-", "~90"),
]
# GPT-2 124M (OpenAI's checkpoint) as Karpathy's build-nanogpt publishes it: val loss 3.2924 on the FineWeb-Edu
# val shard is play.ipynb's `loss_baseline` ("OpenAI GPT-2 (124M) checkpoint val loss"); HellaSwag acc_norm
# 0.2955 is hellaswag.py's figure for its completion-style scoring, which gpt2/evaluation/hellaswag.py reproduces.
PUBLISHED_NAME = "GPT-2 124M (published)"
PUBLISHED = {"val_loss": 3.2924, "hellaswag_acc_norm": 0.2955}


# ---------------------------------------------------------------- markdown from run data
# Stage names, folder names, errors and commands come from files anyone can edit: in report.md they are text,
# never markup. No HTML tag or entity can start (`<`, `&` as entities), no code span (backticks as `&#96;`),
# no new table cell (`|` escaped, and `\` so that an escape cannot be undone) and no new line.

def md_text(value) -> str:
    """`value` as inline markdown text that shows as written: safe in a table cell, a list item, a heading."""
    text = " ".join(str(value).splitlines())
    for char, escaped in (("\\", "\\\\"), ("&", "&amp;"), ("<", "&lt;"), ("`", "&#96;"), ("|", "\\|")):
        text = text.replace(char, escaped)
    return text


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def md_code(value) -> str:
    """`value` as one inline code span (outside tables): a fence longer than any run of backticks inside."""
    text = " ".join(str(value).splitlines())
    fence = "`" * (_longest_backtick_run(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_code_block(value) -> list:
    """`value` as a fenced code block (markdown lines): its fence longer than any run of backticks inside."""
    text = str(value)
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    return [fence, *text.splitlines(), fence]


def md_table(header, rows, right=()) -> str:
    """A GitHub pipe table of md_text cells; columns in `right` right-aligned, the others left as written."""
    table = pd.DataFrame([[md_text(c) for c in r] for r in rows], columns=[md_text(h) for h in header])
    return table.to_markdown(index=False, disable_numparse=True,
                             colalign=["right" if h in right else None for h in header])


def reference_section(evaluated=False) -> list:
    """The report's closing section (markdown lines): the published figures, apart from the measured tables;
    GPT-2 124M's val loss and HellaSwag only where some run evaluated."""
    header = ["stage", "seed README, H100, ms/step (B=16, T=1024, read off screenshots)",
              "build-nanogpt video, A100, ms/step (B=16, T=1024)"]
    out = ["## Published reference figures (not measured here)", "",
           "These are published figures, not measured here: the seed repository's README (H100, read off its "
           "screenshots) and Karpathy's build-nanogpt video (A100). Compare them with the measured tables "
           "above only as orientation.", "", md_table(header, REFERENCE), ""]
    if evaluated:
        quality = ["model", "val loss (FineWeb-Edu val)", "HellaSwag acc_norm"]
        out += ["Model quality as build-nanogpt publishes it (val loss: play.ipynb; HellaSwag acc_norm: "
                "hellaswag.py's completion-style scoring, which gpt2/evaluation/hellaswag.py reproduces):", "",
                md_table(quality, [[PUBLISHED_NAME, PUBLISHED["val_loss"], PUBLISHED["hellaswag_acc_norm"]]],
                         right=quality[1:]), ""]
    return out


def _interval(start, end):
    try:
        a, b = pd.Timestamp(start), pd.Timestamp(end)
    except (TypeError, ValueError):
        return None
    return None if pd.isna(a) or pd.isna(b) else (a, b)


def overlaps(facts: list) -> list:
    """For each run, the indices of the other runs that ran at the same time on the same host and device.

    facts: one (host, device, gpus, started_at, finished_at) per run, None where unknown. Two runs share a
    device when their hosts are equal, their devices agree (or one is unknown: it failed before it chose one),
    and their GPU lists (SLURM's or CUDA_VISIBLE_DEVICES) share an id, or either is unknown (then every GPU of
    the host was visible). They overlap when each started before the other finished; the times are whole
    seconds, so runs that merely follow each other within one second do not count. A run without a host or
    without both times (summaries from before the host was recorded, a killed run) is never flagged."""
    spans = [_interval(f[3], f[4]) if f[0] else None for f in facts]
    out = []
    for i, (host, device, gpus, *_) in enumerate(facts):
        found = []
        for j, (host2, device2, gpus2, *_) in enumerate(facts):
            if j == i or spans[i] is None or spans[j] is None or host != host2:
                continue
            if device and device2 and device != device2:
                continue
            if gpus and gpus2 and not set(str(gpus).split(",")) & set(str(gpus2).split(",")):
                continue
            if spans[i][0] < spans[j][1] and spans[j][0] < spans[i][1]:
                found.append(j)
        out.append(found)
    return out
