"""The speed-up table's columns, each defined once: its header, its cell, its alignment and when it is shown.

A new column of report.md is one `Column` in `columns()` (and, when it reads a new summary.json field, one entry
in gpt2/summary_schema.py's RunSummary): the header row, every data row and the alignment all come from this list.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional

from gpt2.reporting import cells
from gpt2.reporting import rules

fmt = cells.fmt


@dataclass(frozen=True)
class TableOptions:
    """What one table shows beyond the columns every table has (decided from all of a folder's runs)."""
    varying: list  # (label, field, numeric?) of the run facts that differ between rows: a column each
    mfu_label: str  # "MFU %", or "MFU % (measured peak)" when every peak was measured on the machine
    show_error: bool = False  # some run has an error message
    show_reserved: bool = False  # some run recorded what the caching allocator reserved (a GPU)
    best_val: bool = False  # some run validated more than once
    hellaswag: bool = False  # some run ran HellaSwag
    show_overlap: bool = False  # some timed run ran alongside another


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable  # (row, stage of the row above or None, options) -> the cell's text
    right: bool = False  # right-aligned: a number
    shown: Callable = lambda options: True


def _prev_cell(r, above: Optional[str], _options) -> str:
    prev = cells.ratio(r["speedup_vs_prev"])
    if prev and above != r["prev_stage"]:
        prev += f" (vs {r['prev_stage']})"  # the row above failed: compare with the last ok one
    return prev


def _mfu_cell(r, _above, options: TableOptions) -> str:
    mfu = fmt(r["mfu"], "{:.1%}")[:-1]
    if mfu and isinstance(r["mfu_note"], str):  # above 100 % of a measured peak: not a figure to print
        return "n/a (above the measured peak)"
    if mfu and options.mfu_label == "MFU %" and r["mfu_peak_source"] == "measured":
        return mfu + " (measured peak)"
    return mfu


def _field(name: str, spec: str = "{}") -> Callable:
    """A cell that is the run's `name` formatted with `spec` (empty where the run has no such figure)."""
    return lambda r, _above, _options: fmt(r[name], spec)


def _varying_column(label: str, name: str, numeric: bool) -> Column:
    return Column(label, _field(name), right=numeric)


def columns(options: TableOptions) -> List[Column]:
    """The table's columns, in order, with those the options leave out already dropped."""
    all_columns = [
        Column("job", _field("job"), right=True),
        Column("stage", lambda r, _a, _o: r["stage"]),
        Column("adds", lambda r, _a, _o: cells.adds_cell(r)),
        *(_varying_column(label, name, numeric) for label, name, numeric in options.varying),
        Column("tokens/step", _field("tokens_per_step", "{:,}"), right=True),
        Column("ms/step (min-max)", lambda r, _a, _o: cells.ms_cell(r)),
        Column("step IQR %", lambda r, _a, _o: cells.noise_cell(r), right=True),
        Column("tok/s", _field("tokens_per_sec", "{:,.0f}"), right=True),
        Column("vs baseline", lambda r, _a, _o: cells.ratio(r["speedup_vs_baseline"]), right=True),
        Column("vs previous", _prev_cell),
        Column(options.mfu_label, _mfu_cell, right=True),
        Column("peak mem GiB", lambda r, _a, _o: cells.mem_cell(r["peak_mem_gib"]), right=True),
        Column("peak reserved GiB", lambda r, _a, _o: cells.mem_cell(r["peak_mem_reserved_gib"]), right=True,
               shown=lambda o: o.show_reserved),
        Column("final loss", _field("final_loss", "{:.3f}"), right=True),
        Column("val loss", _field("val_loss", "{:.3f}"), right=True),
        Column("val loss (best)", _field("val_loss_best", "{:.3f}"), right=True, shown=lambda o: o.best_val),
        Column("HellaSwag acc_norm", _field("hellaswag_acc_norm", "{:.4f}"), right=True,
               shown=lambda o: o.hellaswag),
        Column("HellaSwag acc_norm (best)", _field("hellaswag_acc_norm_best", "{:.4f}"), right=True,
               shown=lambda o: o.hellaswag),
        Column("status", lambda r, _a, _o: r["status"]),
        Column("error", lambda r, _a, _o: cells.short_error(r["error"]), shown=lambda o: o.show_error),
        Column("timing not comparable: ran alongside", lambda r, _a, _o: r["overlapped_with"],
               shown=lambda o: o.show_overlap),
    ]
    return [c for c in all_columns if c.shown(options)]


def markdown_table(df, options: TableOptions) -> str:
    """One group's runs as a markdown table, with a line where the stages beyond the seed's seven begin."""
    shown = columns(options)
    header = [c.header for c in shown]
    rows, stages = [], list(df["stage"])
    for i, (_, r) in enumerate(df.iterrows()):
        above = stages[i - 1] if i else None
        if i and r["stage"] not in rules.SEED_STAGES and above in rules.SEED_STAGES:
            rows.append(["", rules.BEYOND_THE_SEED] + [""] * (len(header) - 2))  # a line, not a run
        rows.append([c.cell(r, above, options) for c in shown])
    return rules.md_table(header, rows, {c.header for c in shown if c.right})
