"""Measure a whole GPU in one go: environment, the CUDA tests, every stage, a micro-batch scan, one table.

    python -m gpt2.bench --out DIR [--budget-s 480] [--data FILE] [--llmc DIR] [--smoke]

Phases in priority order, each under its own time limit inside the budget; a phase that would not fit in
what is left is recorded as skipped, never started and cut off:

    env     DIR/env.json: GPU, memory, driver, torch, CUDA, cuDNN, Triton, compilers, measured matmul rate
    tests   `pytest -m cuda tests` (tests/test_cuda.py, the flash4 kernel; DIR/tests.log, DIR/tests.xml)
    sweep   `python run.py -m +sweep=speedup_full`, every stage at B=16, T=1024; report in DIR/sweep/
    candidates  the stages beyond the sweep (fp8-head, flash4) and Inductor options, each beside the stage
            it builds on (gpt2/benchmark/candidates.py): DIR/candidates.json, DIR/candidates/
    peers   llm.c (built from --llmc DIR) and transformers' GPT2LMHeadModel at B=64, T=1024, 524,288
            tokens per step, beside the sweep's fastest stage (gpt2/benchmark/peers.py): DIR/peers.json, DIR/peers/
    scan    the fastest stage at other micro-batch sizes (B=16/32/64/128, T=1024, with peak memory): DIR/scan/
    table   DIR/bench.md and DIR/bench.json: what ran, status, ms/step, tok/s, MFU, peak reserved GiB

Runs never write checkpoints (train.save_checkpoints=false): a SIGTERM at the budget must not start a
1.5 GB save. Stages that compile or accumulate 32 micro-steps run fewer steps than the others (the report
lists steps per stage). `--smoke` runs the same phases CPU-sized (tiny model, T=8, 2 steps (1 in the
scan), no torch.compile, CUDA tests skipped, one CPU thread per run) in under a minute: CI runs it so that
this command never rots.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import List, Optional

from gpt2.benchmark.candidates import FULL_SWEEP, candidates_markdown, first_default, run_candidates
from gpt2.benchmark.env import environment_facts
from gpt2.errors import UsageError, print_error
from gpt2.benchmark.peers import check_llmc_dir, run_peers
from gpt2.benchmark.peers_table import fastest_run, peers_table
from gpt2.benchmark.time_limit import wait_within

REPO = Path(__file__).resolve().parents[1]  # run.py, conf/ and tests/ sit beside the package
SWEEP = FULL_SWEEP  # the default: every stage, the rows the candidates are compared with
GRACE_S = 60  # after SIGTERM a run finishes its step (a compile can be in flight), then it is killed
TABLE_RESERVE_S = 10  # bench.md at the end
SCAN_BATCH_SIZES = (16, 32, 64, 128)
SMOKE_T = 8  # --smoke: sequence length of the tiny CPU runs (the step time grows with the tokens)
# --smoke: CPU threads of each run. It measures nothing, and on a busy 2-core machine two threads that wait
# for each other at every op made it twice as slow as one (110 s against 56 s, back to back)
SMOKE_THREADS = "1"
# --smoke: steps of each scan run. Its sizes are smaller than the sweep's, so a stage that accumulates makes
# more micro-steps (16 at B=4): one step shows that a size runs, which is all a smoke run checks
SMOKE_SCAN_STEPS = 1


class Bench:
    """The phases share one deadline and one list of what happened."""

    def __init__(self, out: Path, budget_s: float, data: Optional[str], smoke: bool, sweep: str = SWEEP):
        self.out, self.data, self.smoke, self.sweep_name = out, data, smoke, sweep
        self.deadline = time.monotonic() + budget_s
        self.phases: List[dict] = []
        self.facts = {"torch": "?", "cuda": None, "cudnn": None, "triton": None, "python": platform.python_version(),
                      "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "git_commit": None}
        self.sweep_folder: Optional[Path] = None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, phase: str, status: str, seconds: float = 0.0, detail: str = "") -> dict:
        row = {"phase": phase, "status": status, "seconds": round(seconds, 1), "detail": detail}
        self.phases.append(row)
        print(f"[bench] {phase}: {status} ({seconds:.0f} s){': ' + detail if detail else ''}", flush=True)
        self.write()  # after every phase: a bench killed from outside still leaves the table of what finished
        return row

    def write(self) -> str:
        table = bench_table(self, self.facts, self.sweep_folder)
        (self.out / "bench.md").write_text(table)
        (self.out / "bench.json").write_text(json.dumps({"phases": self.phases, "sweep": read_runs(self.sweep_folder),
                                                         "scan": read_runs(self.out / "scan"),
                                                         "candidates": read_runs(self.out / "candidates")},
                                                        indent=2) + "\n")
        return table

    def fits(self, phase: str, needs_s: float) -> bool:
        if self.left() - TABLE_RESERVE_S >= needs_s:
            return True
        self.record(phase, "skipped", 0, f"needs about {needs_s:.0f} s, {max(self.left(), 0):.0f} s of the budget left")
        return False

    def run(self, phase: str, cmd: list, log_name: str, limit_s: float) -> tuple:
        """Run cmd with output to DIR/log_name; SIGTERM at limit_s (the run stops after its step), SIGKILL
        GRACE_S later. (return code or None when killed, seconds)"""
        t0 = time.monotonic()
        print(f"[bench] {phase}: {' '.join(cmd)}  (limit {limit_s:.0f} s)", flush=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0")
        if self.smoke:  # one CPU thread per run, unless the caller chose: see SMOKE_THREADS
            env.setdefault("OMP_NUM_THREADS", SMOKE_THREADS)
        if self.data:
            env["GPT2_SPEEDRUN_TEST_DATA"] = self.data  # the test suite's Tiny Shakespeare (tests/conftest.py)
        with (self.out / log_name).open("w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            code = wait_within(proc, limit_s, GRACE_S, whole_group=False)  # SIGTERM the run: it saves its step
            if code is None:
                log.write(f"\n[bench] stopped at the phase's time limit of {limit_s:.0f} s\n")
        return code, time.monotonic() - t0

    def pack(self) -> None:
        """DIR/bench.tar.gz: every file of DIR in one archive, for machines that hand back only a few files
        (the job folders of a sweep are deep and many)."""
        archive = self.out / "bench.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for path in sorted(self.out.rglob("*")):
                if path.is_file() and path != archive:
                    tar.add(path, arcname=str(path.relative_to(self.out)))

    # ---- phases ----------------------------------------------------------------------------------

    def env(self) -> dict:
        t0 = time.monotonic()
        facts = self.facts = environment_facts(measure=not self.smoke)
        (self.out / "env.json").write_text(json.dumps(facts, indent=2) + "\n")
        gpu = facts.get("gpu") or {}
        self.record("env", "ok", time.monotonic() - t0,
                    f"{gpu.get('name', 'no GPU')}, torch {facts['torch']}, CUDA {facts['cuda']}")
        return facts

    def tests(self) -> None:
        tests = REPO / "tests"
        if not (tests / "test_cuda.py").is_file():
            self.record("tests", "skipped", 0, f"{tests} not found (run from a clone of the repository)")
            return
        limit = 40 if self.smoke else 150
        if not self.fits("tests", min(limit, 60)):
            return
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-ra", "-p", "no:cacheprovider",
               f"--junitxml={self.out / 'tests.xml'}", str(tests)]
        code, seconds = self.run("tests", cmd, "tests.log", min(limit, self.left() - TABLE_RESERVE_S - GRACE_S))
        last = [ln for ln in (self.out / "tests.log").read_text().splitlines() if re.search(r"\d+ (passed|failed|"
                                                                                            r"skipped|error)", ln)]
        detail = last[-1].strip("= ") if last else "no pytest summary line (see tests.log)"
        self.record("tests", "ok" if code == 0 else "timed out" if code is None else "failed", seconds, detail)

    def sweep(self, stages: List[dict]) -> Optional[Path]:
        if not self.fits("sweep", 60 + GRACE_S):
            return None
        folder = self.sweep_folder = self.out / "sweep"
        cmd = [sys.executable, str(REPO / "run.py"), "-m", f"+sweep={self.sweep_name}", f"hydra.sweep.dir={folder}",
               *self.common_overrides()]
        for stage in stages:
            extra = self.stage_overrides(stage)
            if extra:
                cmd.append(f"++sweep.stage_overrides.{stage['name']}=[{','.join(repr(e) for e in extra)}]")
        code, seconds = self.run("sweep", cmd, "sweep.log", self.left() - TABLE_RESERVE_S - GRACE_S)
        runs = read_runs(folder)
        ok = sum(r.get("status") == "ok" for r in runs)
        detail = f"{ok} of {len(stages)} stages ok; report in sweep/report.md"
        status = "ok" if code == 0 else "failed" if code is not None else "timed out"
        if code is None and ok == len(stages) and (folder / "report.md").is_file():
            # every job and the report were done: the limit caught the process on its way out (seen: matplotlib
            # building its font cache after the report), which measured nothing less
            status, detail = "ok", detail + " (the process was still exiting at the phase's time limit)"
        self.record("sweep", status, seconds, detail)
        return folder

    def scan(self, stages: List[dict], sweep_folder: Optional[Path]) -> None:
        runs = [r for r in read_runs(sweep_folder) if r.get("status") == "ok" and r.get("tokens_per_sec")] \
            if sweep_folder else []
        if not runs:
            self.record("scan", "skipped", 0, "no stage of the sweep ended ok")
            return
        fastest = max(runs, key=lambda r: r["tokens_per_sec"])
        stage = next(s for s in stages if s["name"] == fastest["stage"])
        sizes = [4, 8] if self.smoke else list(SCAN_BATCH_SIZES)
        measured = fastest.get("batch_size")
        # the sizes not measured yet first, the largest ones early: "what fits" is the question they answer
        order = sorted((b for b in sizes if b != measured), key=lambda b: (b < measured, -b if b > measured else b))
        folder = self.out / "scan"
        folder.mkdir(exist_ok=True)
        t0, done = time.monotonic(), 0
        for i, b in enumerate(order):
            needs = 20 if self.smoke else (90 if stage["compile"] else 40)
            if not self.fits(f"scan B={b}", needs + GRACE_S):
                continue
            cmd = [sys.executable, str(REPO / "run.py"), f"+stage={stage['name']}", f"train.batch_size={b}",
                   f"stage.name={stage['name']}_B{b}", f"hydra.run.dir={folder / f'{i}_B{b}'}",
                   *self.common_overrides(smoke_steps=SMOKE_SCAN_STEPS), *self.stage_overrides(stage, batch_size=b)]
            code, _ = self.run(f"scan B={b}", cmd, f"scan_B{b}.log", self.left() - TABLE_RESERVE_S - GRACE_S)
            done += 1
        self.record("scan", "ok" if done == len(order) else "partial", time.monotonic() - t0,
                    f"{stage['name']} at B={', '.join(map(str, order[:done]))} (B={measured} is in the sweep)")

    # ---- the runs' settings --------------------------------------------------------------------

    def common_overrides(self, smoke_steps: int = 2) -> list:
        args = ["train.save_checkpoints=false"] + ([] if self.smoke else ["train.val_batches=2"])
        if self.data:
            args.append(f"data.path={self.data}")
        if self.smoke:
            args += ["model=tiny", "train.device=cpu", f"train.seq_len={SMOKE_T}", f"train.steps={smoke_steps}",
                     "train.timing_skip=1", "train.val_batches=1", "train.compile=false"]
        else:
            args += ["train.steps=15"]
        return args

    def stage_overrides(self, stage: dict, batch_size: Optional[int] = None) -> list:
        """Fewer steps for the slow stages (compiling, or 32 micro-steps each); a CPU-sized total batch."""
        extra = []
        if self.smoke:
            if stage["total_batch_size"]:
                extra.append(f"train.total_batch_size={64 * SMOKE_T}")  # 4 micro-steps of B=16, 1 of B=64
        elif stage["total_batch_size"] or stage["compile"]:
            extra += ["train.steps=6", "train.timing_skip=2"]
        return extra


def sweep_stage_names(sweep: str = SWEEP) -> List[str]:
    """The stages conf/sweep/<sweep>.yaml runs, in its order (its `+stage: a,b,c` sweeper parameter)."""
    path = REPO / "conf" / "sweep" / f"{sweep}.yaml"
    stages = re.search(r"\+stage:\s*(\S+)", path.read_text())
    if stages:
        return stages.group(1).split(",")
    parent = first_default(path)  # a sweep built on another (speedup_cpu)
    if not parent:
        raise ValueError(f"conf/sweep/{sweep}.yaml names no stages (+stage: a,b,c) and builds on no other sweep")
    return sweep_stage_names(parent)


def composed_stages(sweep: str = SWEEP) -> List[dict]:
    """The sweep's stages in order, with what each composes to: the settings the bench sizes runs by."""
    return composed(sweep_stage_names(sweep))


def composed(names: List[str]) -> List[dict]:
    """These stages with what each composes to (compile, total and micro batch): what a run is sized by."""
    from hydra import compose, initialize_config_dir

    from gpt2.runs import job  # noqa: F401  (registers the schema and resolvers)

    stages = []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for name in names:
            cfg = compose(config_name="config", overrides=[f"+stage={name}"])
            stages.append({"name": name, "compile": bool(cfg.train.compile),
                           "total_batch_size": cfg.train.total_batch_size, "batch_size": cfg.train.batch_size})
    return stages


def read_runs(folder: Optional[Path]) -> List[dict]:
    if folder is None or not folder.is_dir():
        return []
    runs = []
    for path in sorted(folder.glob("*/summary.json"), key=lambda p: int(p.parent.name.split("_")[0])):
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            runs.append({"stage": path.parent.name, "status": "unreadable"})
    return runs


# ---- the table ------------------------------------------------------------------------------------

def _num(v, spec):
    return "" if v is None else spec.format(v)


def bench_table(bench: Bench, facts: dict, sweep_folder: Optional[Path]) -> str:
    """bench.md; its tables are f-strings for the reason gpt2/benchmark/peers_table.py gives (a driver process with no
    other use for pandas)."""
    gpu = facts.get("gpu") or {}
    lines = ["# Benchmark", "",
             "- **device:** " + (f"{gpu['name']} ({gpu['memory_gib']:.0f} GiB), driver {gpu.get('driver')}"
                                  if gpu else "no GPU")
             + f"; torch {facts['torch']}, CUDA {facts['cuda']}, cuDNN {facts['cudnn']}, "
             f"Triton {facts['triton']}; Python {facts['python']}, {facts['cpu_count']} CPUs",
             f"- **date:** {facts['date']}; commit {facts['git_commit'] or 'n/a'}"]
    if gpu.get("bf16_matmul_tflops_8192"):
        lines.append(f"- **measured ceilings:** bf16 matmul 8192^3 {gpu['bf16_matmul_tflops_8192']:.0f} TFLOP/s; "
                     f"device copy {gpu['copy_gb_per_s_read_plus_write']:.0f} GB/s (read + write)")
    if bench.smoke:
        lines.append(f"- **smoke run:** tiny model on the CPU, T={SMOKE_T}, 2 steps (1 in the scan), "
                     "torch.compile off: checks the command, measures nothing")
    lines += ["", "## Phases", "", "| phase | status | seconds | detail |", "| --- | --- | ---: | --- |"]
    lines += [f"| {p['phase']} | {p['status']} | {p['seconds']:.0f} | {p['detail']} |" for p in bench.phases]
    header = ["| run | stage | B | steps | status | ms/step | tok/s | MFU % | peak alloc GiB | peak reserved GiB |",
              "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for title, folder in (("Sweep (sweep/report.md has the full report)", sweep_folder),
                          ("Micro-batch scan", bench.out / "scan")):
        runs = read_runs(folder)
        if not runs:
            continue
        lines += ["", f"## {title}", ""] + header
        for r in runs:
            lines.append(
                f"| {folder.name} | {r.get('stage')} | {r.get('batch_size') or ''} | {r.get('steps', '')} | "
                f"{r.get('status')} | {_num(r.get('ms_per_step'), '{:.1f}')} | "
                f"{_num(r.get('tokens_per_sec'), '{:,.0f}')} "
                f"| {_num(r.get('mfu') and 100 * r['mfu'], '{:.1f}')} | {_num(r.get('peak_mem_gib'), '{:.1f}')} | "
                f"{_num(r.get('peak_mem_reserved_gib'), '{:.1f}')} |")
        errors = [f"- {r.get('stage')}: {r['error']}" for r in runs if r.get("status") != "ok" and r.get("error")]
        lines += ["", *errors] if errors else []
    lines += candidates_markdown(bench.out, read_runs(sweep_folder))
    lines += peers_table(bench.out)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2.bench", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder for everything it writes")
    p.add_argument("--budget-s", type=float, default=480, help="wall-clock budget for all phases (default 480)")
    p.add_argument("--data", metavar="FILE", help="Tiny Shakespeare (or any text) instead of the download/cache")
    p.add_argument("--smoke", action="store_true", help="CPU-sized: tiny model, a few steps, in under a minute")
    p.add_argument("--llmc", metavar="DIR", help="a karpathy/llm.c checkout: build train_gpt2cu, time it beside ours")
    p.add_argument("--sweep", default=SWEEP, help=f"the sweep config of conf/sweep/ to run (default {SWEEP})")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f"--out {out} already holds files; nothing was overwritten: choose a new folder")
        if args.data and not Path(args.data).is_file():
            raise UsageError(f"--data {args.data}: no such file; give a text file, or leave --data out to download")
        if not (REPO / "conf" / "sweep" / f"{args.sweep}.yaml").is_file():
            raise UsageError(f"--sweep {args.sweep}: no conf/sweep/{args.sweep}.yaml; choose one of "
                             + ", ".join(sorted(p.stem for p in (REPO / "conf" / "sweep").glob("*.yaml"))))
        if args.budget_s < 30:
            raise UsageError(f"--budget-s {args.budget_s:g} is too short to measure anything: give 30 or more")
        llmc = check_llmc_dir(args.llmc)
        out.mkdir(parents=True, exist_ok=True)
    except (UsageError, OSError) as e:  # an --out that cannot be made is bad input too
        return print_error(e)
    bench = Bench(out.resolve(), args.budget_s, str(Path(args.data).resolve()) if args.data else None, args.smoke,
                  args.sweep)
    try:
        bench.env()
        stages = composed_stages(args.sweep)
        bench.tests()
        sweep_folder = bench.sweep(stages)
        run_candidates(bench, stages, composed, REPO, GRACE_S, TABLE_RESERVE_S)
        run_peers(bench, llmc, fastest_run(read_runs(sweep_folder)))
        bench.scan(stages, sweep_folder)
    except KeyboardInterrupt:
        bench.record("bench", "interrupted", 0, "stopped by a signal; the table shows what finished")
    except Exception as e:  # a bug or a broken config: keep what ran, say what broke
        bench.record("bench", "failed", 0, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
    finally:
        print(bench.write())
        bench.pack()
    failed = [p for p in bench.phases if p["status"] in ("failed", "timed out", "interrupted")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
