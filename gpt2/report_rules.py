"""The report's judgement calls, kept apart so each is one small function to read and test: when a row's
timing is noisy, which runs may be compared, and what a stage's "adds" text must say about what really ran.
The rules are stated in gpt2/report.py's docstring; the report's header repeats them."""

import json
import re
import statistics
from pathlib import Path

NOISE_IQR = 0.10  # interquartile range of the steady-state step times above 10 % of their median: noisy
NOISE_RANGE = 1.5  # max/min of the summary above this: noisy (only where metrics.jsonl has no step times)
GROUP_FIELDS = [("model", "model"), ("device", "device"), ("T", "seq_len"), ("world size", "world_size")]


def step_times(path, n: int) -> list:
    """The last n step times (ms) in a run's metrics.jsonl: the steady-state steps its summary's median is of
    (the first `steps - steps_measured` are warm-up; a resumed run appends, its last steps are this process's)."""
    times = []
    try:
        lines = (Path(path) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return times
    for line in lines:
        try:
            times.append(float(json.loads(line)["ms"]))
        except (ValueError, KeyError, TypeError):
            continue  # a validation line, or a partial last line of a killed run
    return times[-n:] if n > 0 else []


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
