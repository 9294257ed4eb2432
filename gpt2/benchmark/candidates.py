"""The bench's `candidates` phase: what might beat the sweep's last stage, each run once beside the stage it
builds on, on the same card in the same call.

    stages   every conf/stage/*.yaml the sweep does not run (fp8-head, flash4, a user's own), as it is
    options  the Inductor options worth a key (OPTIONS), on the stage they are meant for

A run the check before the start refuses (flash4 without its package, fp8-head on a GPU before sm89) is a row
`refused` with the one-line reason, not a failure: it says what this card cannot run. The rows give tok/s
against the sweep's row of the stage they build on; a candidate joins the sweep when it pays there.
"""

import json
import re
import sys
import time
from pathlib import Path
from typing import List, Optional

# (name, the stage it runs on, its overrides): Inductor options measured as keys, not stages (README, compile)
OPTIONS = [("big-batch_cdt", "big-batch", ["+train.compile_options.coordinate_descent_tuning=true"])]
FULL_SWEEP = "speedup_full"  # the sweep whose rows the candidates are compared with (every stage, at its sizes)
LIMIT_FACTOR = 3  # a candidate's time limit: this many times what it should need


def first_default(config_file: Path) -> Optional[str]:
    """The first entry of a config file's defaults list: the stage a stage builds on, the sweep a sweep does."""
    match = re.search(r"^defaults:\s*\n\s*-\s*(\S+)", config_file.read_text(), re.M)
    return match.group(1) if match else None


def builds_on(conf: Path, stage: str) -> Optional[str]:
    """The stage a stage file builds on (None for the baseline)."""
    return first_default(conf / "stage" / f"{stage}.yaml")


def candidate_runs(conf: Path, swept: List[str]) -> List[dict]:
    """The stages beyond the sweep, then OPTIONS: name, the stage its figures are compared with, overrides."""
    beyond = sorted(p.stem for p in (conf / "stage").glob("*.yaml") if p.stem not in swept)
    runs = [{"name": s, "builds_on": builds_on(conf, s), "stage": s, "overrides": []} for s in beyond]
    runs += [{"name": n, "builds_on": s, "stage": s, "overrides": list(o)} for n, s, o in OPTIONS if s in swept]
    return runs


def refusal(log: Path) -> str:
    """The one line a refused run printed (`error: ...`), without the prefix."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("error: ")]
    return lines[-1].removeprefix("error: ") if lines else "refused before the start (see the log)"


def run_candidates(bench, stages: List[dict], compose, repo: Path, grace_s: float, table_reserve_s: float) -> None:
    """The phase: each candidate as one run into DIR/candidates/<i>_<name>/, under what the budget leaves.
    stages: the sweep's, composed; compose: names -> the same for a candidate's own stage (its sizes)."""
    if bench.sweep_name != FULL_SWEEP:  # another sweep may set its own sizes (speedup_cpu): no like-for-like row
        bench.record("candidates", "skipped", 0, f"they run beside the rows of +sweep={FULL_SWEEP}, and this bench "
                                                 f"ran +sweep={bench.sweep_name}")
        return
    folder = bench.out / "candidates"
    folder.mkdir(exist_ok=True)
    t0, rows = time.monotonic(), []
    for i, run in enumerate(candidate_runs(repo / "conf", [s["name"] for s in stages])):
        rows.append(_run_one(bench, folder, i, run, compose, repo, grace_s, table_reserve_s))
    (bench.out / "candidates.json").write_text(json.dumps(rows, indent=2) + "\n")
    bad = [r for r in rows if r["status"] not in ("ok", "refused", "skipped")]
    bench.record("candidates", "partial" if bad else "ok", time.monotonic() - t0,
                 "; ".join(f"{r['name']} {r['status']}" for r in rows) or "no candidates")


def _run_one(bench, folder: Path, i: int, run: dict, compose, repo: Path, grace_s: float,
             table_reserve_s: float) -> dict:
    """One candidate's row: skipped, refused (with the reason), or what its summary.json says."""
    row = {"name": run["name"], "builds_on": run["builds_on"], "status": "skipped", "detail": ""}
    if run["overrides"] and bench.smoke:  # the options are torch.compile's, and --smoke runs without it
        return {**row, "detail": "--smoke runs without torch.compile"}
    try:
        (sizes,) = compose([run["stage"]])
    except Exception as e:  # a stage file of the user's that does not compose: its row says so, the rest run
        return {**row, "status": "failed", "detail": f"conf/stage/{run['stage']}.yaml does not compose: "
                                                     + (str(e).strip().splitlines() or [type(e).__name__])[0][:200]}
    needs = 20 if bench.smoke else (90 if sizes["compile"] else 40)
    if not bench.fits(f"candidate {run['name']}", needs + grace_s):
        return {**row, "detail": "did not fit in the budget"}
    run_dir = folder / f"{i}_{run['name']}"
    cmd = [sys.executable, str(repo / "run.py"), f"+stage={run['stage']}", *run["overrides"],
           f"stage.name={run['name']}", f"hydra.run.dir={run_dir}", *bench.common_overrides(),
           *bench.stage_overrides(sizes)]
    log = f"candidate_{run['name']}.log"
    # at most a few times what it should need: a candidate that hangs (a kernel's JIT) leaves the peers their time
    limit = min(bench.left() - table_reserve_s - grace_s, LIMIT_FACTOR * needs)
    code, _ = bench.run(f"candidate {run['name']}", cmd, log, limit)
    summary = run_dir / "summary.json"
    if code == 2 and not summary.is_file():
        return {**row, "status": "refused", "detail": refusal(bench.out / log)}
    if summary.is_file():
        s = json.loads(summary.read_text())
        return {**row, "status": s.get("status"), "detail": (s.get("error") or "")[:200],
                "ms_per_step": s.get("ms_per_step"), "tokens_per_sec": s.get("tokens_per_sec")}
    return {**row, "status": "failed" if code is not None else "timed out", "detail": f"see {log}"}


def candidates_markdown(out: Path, sweep_runs: List[dict]) -> List[str]:
    """bench.md's "Beyond the sweep" section (f-strings, for the reason peers_table.peers_markdown gives)."""
    path = out / "candidates.json"
    if not path.is_file():
        return []
    base = {r.get("stage"): r for r in sweep_runs if r.get("status") == "ok" and r.get("tokens_per_sec")}
    lines = ["", "## Beyond the sweep, same card, same call", "",
             "Each candidate once, beside the sweep's row of the stage it builds on (vs = tok/s over that row's).",
             "", "| candidate | builds on | status | ms/step | tok/s | vs | detail |",
             "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    rows = json.loads(path.read_text())
    base.update({r["name"]: r for r in rows if r["status"] == "ok" and r.get("tokens_per_sec")
                 and r["name"] not in base})  # a stage built on another candidate (a user's own on flash4)
    for r in rows:
        ref = base.get(r["builds_on"])
        ratio = (r["tokens_per_sec"] / ref["tokens_per_sec"]) if ref and r.get("tokens_per_sec") else None
        cells = [r["name"], r["builds_on"] or "", r["status"],
                 "" if r.get("ms_per_step") is None else f"{r['ms_per_step']:.1f}",
                 "" if r.get("tokens_per_sec") is None else f"{r['tokens_per_sec']:,.0f}",
                 "" if ratio is None else f"{ratio:.3f}x", r["detail"].replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
