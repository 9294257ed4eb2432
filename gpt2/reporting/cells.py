"""How one value of a run shows in a cell of the report's tables: blanks for what is missing, the figures
rounded as the tables print them, ratios as "2.07x", the one line of an error that says what went wrong."""

import math

import pandas as pd

from gpt2.reporting import rules


def missing(v) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def flagged(v) -> bool:
    return not missing(v) and bool(v)


def fmt(v, spec="{}"):
    if missing(v):
        return ""
    return f"{v:.4g}" if spec == "{}" and isinstance(v, float) else spec.format(v)


def short_error(err) -> str:
    lines = [ln.strip() for ln in ("" if missing(err) else str(err)).splitlines() if ln.strip()]
    if not lines:
        return ""
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    return line if len(line) <= 120 else line[:117] + "..."


def uniques(series):
    return sorted({fmt(v) for v in series if not missing(v)})


def ratio(x) -> str:
    return "" if missing(x) else f"{x:.2f}x" if x >= 0.1 else f"{x:.2g}x"


def ms_cell(r):
    ms = fmt(r["ms_per_step"], "{:.1f}")
    if ms and not missing(r["ms_per_step_min"]) and not missing(r["ms_per_step_max"]):
        ms += f" ({r['ms_per_step_min']:.1f}-{r['ms_per_step_max']:.1f})"
    return ms


def mem_cell(v):
    return "" if missing(v) else (f"{v:.1f}" if v >= 1 else f"{v:.3g}")


def adds_cell(r) -> str:
    """The stage's own text, plus what ran where the run differs from a figure it names, and the Inductor
    options it ran with (train.compile_options): two runs of one stage are told apart by them."""
    facts = [None if missing(r[c]) else int(r[c])
             for c in ("tokens_per_step", "grad_accum_steps", "world_size", "batch_size")]
    options = r.get("compile_options")
    inductor = "" if missing(options) else f"(Inductor: {options})"
    return " ".join(x for x in (fmt(r["adds"]), rules.adds_ran(fmt(r["adds"]), *facts), inductor) if x)


def noise_cell(r) -> str:
    rel, flag = r["ms_iqr_rel"], r["noisy"]
    cell = "" if missing(rel) else f"{100 * rel:.1f}"
    if flagged(flag) and missing(rel):
        cell = f"max/min {r['ms_per_step_max'] / r['ms_per_step_min']:.1f}x"
    return (cell + " noisy").strip() if flagged(flag) else cell
