"""What the report reads of one run: its summary.json, every value checked against the type the report needs.

A summary that cannot be trusted (not valid JSON, a number past 64 bits, NaN or Infinity where a run cannot
have one, a string where a number goes: a hand edit, another tool's file, a damaged disk) becomes a row of
its own, `unreadable: <why>`, with no figures; the other runs' rows are reported as ever. A folder without
summary.json (a process killed before writing one) is `incomplete`, as is a run still `running`.
"""

import json
import logging
import math
import re
from pathlib import Path

from gpt2.summary_schema import number_type

log = logging.getLogger(__name__)

# the summary.json fields in report.csv, in its order; the report reads two more (the job's number, HellaSwag).
# Each is checked as the type gpt2/summary_schema.py declares for it. A new column: a field here and a Column
# in gpt2/reporting/columns.py
FIELDS = ["stage", "adds", "status", "error", "device", "device_type", "torch_version", "cuda_version", "model",
          "batch_size", "seq_len", "world_size", "grad_accum_steps", "tokens_per_step", "steps", "steps_measured",
          "ms_per_step", "ms_per_step_min", "ms_per_step_max", "tokens_per_sec", "mfu", "mfu_peak_tflops",
          "mfu_peak_source", "mfu_note", "compute_dtype", "peak_mem_gib", "peak_mem_reserved_gib", "device_mem_gib",
          "peak_mem_kind", "final_loss", "val_loss", "started_at", "finished_at", "command", "host", "gpus"]
READ = FIELDS + ["job_num", "hellaswag_acc_norm"]
TEXT = [f for f in READ if number_type(f) is None]
INTEGER = [f for f in READ if number_type(f) is int]
FLOAT = [f for f in READ if number_type(f) is float]
# a diverged run's losses are NaN or infinite; gpt2/runs/job.py writes them as the strings "nan" / "inf" (JSON has
# no NaN). Anywhere else a non-finite number is a broken file.
MAY_BE_NON_FINITE = {"final_loss", "val_loss"}
NON_FINITE_TEXT = {"nan", "inf", "-inf"}
INT64_MAX = 2 ** 63 - 1


class Unreadable(ValueError):
    """Why a summary.json cannot be reported: one line, naming the file's problem."""


def _refuse_constant(name):
    raise Unreadable(f"summary.json holds {name}, which JSON does not allow")


def _shown(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _integer(key, value):
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Unreadable(f"{key}={_shown(value)} is not a whole number")
    if abs(value) > INT64_MAX:
        raise Unreadable(f"{key}={_shown(value)} does not fit a 64-bit integer")
    return value


def _float(key, value):
    if isinstance(value, str) and value.lower() in NON_FINITE_TEXT:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Unreadable(f"{key}={_shown(value)} is not a number")
    try:
        value = float(value)
    except OverflowError:
        raise Unreadable(f"{key}={_shown(value)} is too large for a number") from None
    if not math.isfinite(value) and key not in MAY_BE_NON_FINITE:
        raise Unreadable(f"{key}={value} is not a finite number")
    return value


def _text(key, value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. a CUDA version written as a number
    if not isinstance(value, str):
        raise Unreadable(f"{key}={_shown(value)} is not text")
    return value


def inductor_options(summary: dict):
    """The run's effective.compile_options as one text, `name=value, ...` by name; None where it had none (the
    Inductor defaults). Another shape than names to plain values is Unreadable, as a field of the wrong type."""
    effective = summary.get("effective")
    options = effective.get("compile_options") if isinstance(effective, dict) else None
    if not options:
        return None
    if not isinstance(options, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, (bool, int, float, str))) for k, v in options.items()):
        raise Unreadable(f"effective.compile_options={_shown(options)} is not a map of Inductor option names to "
                         "values")
    return ", ".join(f"{name}={value}" for name, value in sorted(options.items()))


def checked(summary: dict) -> dict:
    """The report's fields of a parsed summary, each None or of its type (ints, floats, str), and the Inductor
    options it ran with; Unreadable names the first field that is not."""
    out = {}
    for keys, convert in ((TEXT, _text), (INTEGER, _integer), (FLOAT, _float)):
        for key in keys:
            value = summary.get(key)
            out[key] = None if value is None else convert(key, value)
    out["compile_options"] = inductor_options(summary)
    return out


def read_summary(run_dir: Path):
    """(fields, problem) of a run folder's summary.json: checked()'s dict and None; or None and why the summary
    is unreadable (one line); or (None, None) where there is no summary, or one that is not a run's summary
    (a list, a number: shown as incomplete, as before)."""
    try:
        data = _parse(Path(run_dir) / "summary.json")
        if data is None or not isinstance(data, dict):
            if data is not None:
                log.warning("%s: summary.json holds a %s, not a run's summary; shown as incomplete", run_dir,
                            type(data).__name__)
            return None, None
        return checked(data), None
    except Unreadable as e:
        log.warning("%s: %s; shown as unreadable", run_dir, e)
        return None, str(e)


def _parse(path: Path):
    """The JSON value in path, None where there is no file; Unreadable says why it cannot be had."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise Unreadable("summary.json is not UTF-8 text") from None
    except OSError as e:
        raise Unreadable(f"summary.json cannot be read ({e.strerror or e.__class__.__name__})") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise Unreadable(f"summary.json is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except Unreadable:
        raise
    except (ValueError, RecursionError) as e:  # an integer of more digits than Python parses, deep nesting
        raise Unreadable(f"summary.json cannot be parsed ({str(e).splitlines()[0][:80]})") from None


def job_and_stage(run_dir: Path, is_sweep_job: bool):
    """(job number or None, stage name) from a Hydra job folder's name `<num>_<stage>`; a single run's folder
    (or a name whose number is past 64 bits) gives its whole name as the stage."""
    m = re.match(r"^(\d+)_(.+)$", run_dir.name, re.DOTALL) if is_sweep_job else None
    if m and int(m.group(1)) <= INT64_MAX:
        return int(m.group(1)), m.group(2)
    return None, run_dir.name
