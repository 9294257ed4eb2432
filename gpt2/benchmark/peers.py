"""Peers measured side by side on the same card, in the same call: the bench's `peers` phase.

    llm.c          karpathy/llm.c's train_gpt2cu, built from the checkout `--llmc DIR` names (peers_llmc.py)
    transformers   GPT2LMHeadModel, sdpa, bf16 autocast, torch.compile, fused AdamW (peers_hf.py)

Both train GPT-2 124M from random init at B=64, T=1024, 524,288 tokens per optimizer step, on the same Tiny
Shakespeare tokens (one llm.c token file, read by both), each in its own process under a time limit
inside the phase's. ms/step is the median after the first steps; ours/peer divides our fastest sweep
stage's tok/s by the peer's. DIR/peers.json holds the rows, DIR/peers/ the logs, bench.md the table. A peer
that cannot run (no checkout, no nvcc, make fails, the binary crashes, the limit) is a row with its status
and a one-line reason, never a traceback and never a figure it did not measure.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

from gpt2.benchmark import peers_llmc
from gpt2.errors import UsageError
from gpt2.benchmark.peers_table import ours_over_peer
from gpt2.benchmark.time_limit import wait_within

REPO = Path(__file__).resolve().parents[2]
NO_CHECKOUT = "no llm.c checkout given (--llmc DIR)"
BUILD_LIMIT_S = 300  # nvcc takes about a minute for train_gpt2cu, a few with cuDNN's attention
LLMC_RUN_LIMIT_S = 180  # 20 steps of ~1 s, the start-up and two one-batch validations
HF_LIMIT_S = 360  # compiling takes a minute or two, then 20 steps of 1-2 s
HF_RESERVE_S = 120  # kept back for the transformers peer while llm.c builds and runs
KILL_GRACE_S = 10  # after SIGTERM at a limit, then SIGKILL
MIN_PEER_S = 30  # less left than this for a peer: skipped, not started and cut off (smoke: 5)


@dataclass(frozen=True)
class PeerSizes:
    batch_size: int
    seq_len: int
    total_batch: int  # tokens per optimizer step
    steps: int
    skip: int  # first steps left out of the median (start-up, compiling)


GPU_SIZES = PeerSizes(64, 1024, 524288, 20, 3)
SMOKE_SIZES = PeerSizes(4, 8, 64, 4, 1)  # 2 micro-steps of 4 x 8: checks the plumbing, measures nothing


def check_llmc_dir(path: Optional[str]) -> Optional[Path]:
    """--llmc DIR, checked before anything runs; None when not given."""
    if path is None:
        return None
    folder = Path(path).expanduser()
    missing = [name for name in ("Makefile", "train_gpt2.cu") if not (folder / name).is_file()]
    if not folder.is_dir() or missing:
        what = "no such folder" if not folder.is_dir() else f"no {' or '.join(missing)} in it"
        raise UsageError(f"--llmc {path}: {what}; give the root of a karpathy/llm.c checkout "
                         f"(git clone https://github.com/karpathy/llm.c), or leave --llmc out")
    return folder.resolve()


def run_logged(cmd: List[str], log_path: Path, limit_s: float, cwd: Optional[Path] = None,
               env: Optional[dict] = None) -> Optional[int]:
    """cmd's exit code, its output in log_path; None when it ran past limit_s (SIGTERM to its process
    group, SIGKILL KILL_GRACE_S later)."""
    with log_path.open("w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        except OSError as e:  # not executable, no such file
            log.write(f"{e}\n")
            return 127
        code = wait_within(proc, limit_s, KILL_GRACE_S, whole_group=True)
        if code is None:
            log.write(f"\n[peers] stopped at the time limit of {limit_s:.0f} s\n")
        return code


def last_line(log_path: Path, skip_prefixes=("make: ***", "make[", "[peers]", "$ ")) -> str:
    """The last line that says something: for make, the compiler's error rather than make's "Error 1"."""
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    telling = [ln for ln in lines if not ln.startswith(skip_prefixes)]
    line = (telling or lines or ["(no output)"])[-1]
    return line if len(line) <= 200 else line[:197] + "..."


def too_late(peer: str, deadline: float, smoke: bool, sizes: PeerSizes) -> Optional[dict]:
    left, needs = deadline - time.monotonic(), 5 if smoke else MIN_PEER_S
    if left >= needs:
        return None
    return peer_row(peer, "skipped", f"needs at least {needs} s, {max(left, 0):.0f} s of the budget left", sizes)


def peer_row(peer: str, status: str, reason: str = "", sizes: Optional[PeerSizes] = None, **facts) -> dict:
    row = {"peer": peer, "status": status, "reason": reason, "ms_per_step": None, "tokens_per_sec": None,
           "ours_over_peer": None}
    if sizes:
        row.update(batch_size=sizes.batch_size, seq_len=sizes.seq_len, tokens_per_step=sizes.total_batch)
    row.update(facts)
    return row


# ---- llm.c ----------------------------------------------------------------------------------------

def find_nvcc() -> Optional[Path]:
    found = shutil.which("nvcc")
    default = Path("/usr/local/cuda/bin/nvcc")
    return Path(found) if found else default if default.is_file() else None


def _checkout_commit(checkout: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def build_llmc(checkout: Path, folder: Path, deadline: float, capability, env: dict) -> tuple:
    """(binary or None, reason, cuDNN used): make train_gpt2cu, with cuDNN's attention where its frontend
    headers are found, and again without it when that build fails (cuDNN's library may be missing)."""
    frontend = peers_llmc.find_cudnn_frontend(checkout)
    for use in ([frontend, None] if frontend else [None]):
        log = folder / ("llmc_build_cudnn.log" if use else "llmc_build.log")
        limit = min(BUILD_LIMIT_S, deadline - time.monotonic())
        code = run_logged(peers_llmc.make_command(capability, use), log, limit, cwd=checkout, env=env)
        if code == 0:
            binary = checkout / "train_gpt2cu"
            if binary.is_file():
                return binary, "", bool(use)
            return None, "make ended well but wrote no train_gpt2cu", bool(use)
        reason = "make timed out" if code is None else f"make failed: {last_line(log)}"
    return None, reason, False


def llmc_peer(checkout: Optional[Path], train_file: Path, val_file: Path, sizes: PeerSizes, folder: Path,
              deadline: float, capability=None, need_nvcc: bool = True) -> dict:
    name = "llm.c"
    if checkout is None:
        return peer_row(name, "skipped", NO_CHECKOUT, sizes)
    env = dict(os.environ)
    nvcc = find_nvcc()
    if need_nvcc and nvcc is None:
        return peer_row(name, "skipped", "no nvcc (the CUDA toolkit) on PATH or in /usr/local/cuda/bin: "
                        "llm.c is built from source", sizes)
    if nvcc is not None:  # llm.c's Makefile finds nvcc with `which`
        env["PATH"] = f"{nvcc.parent}{os.pathsep}{env.get('PATH', '')}"
    late = too_late(name, deadline, not need_nvcc, sizes)
    if late:
        return late
    facts = {"commit": _checkout_commit(checkout), "checkout": str(checkout)}
    binary, reason, cudnn = build_llmc(checkout, folder, deadline, capability, env)
    facts["cudnn"] = cudnn
    if binary is None:
        return peer_row(name, "timed out" if reason == "make timed out" else "failed", reason, sizes, **facts)
    cmd = [str(binary), *peers_llmc.train_args(train_file, val_file, sizes.batch_size, sizes.seq_len,
                                               sizes.total_batch, sizes.steps)]
    if shutil.which("stdbuf"):  # line-buffered: a run stopped at the limit still leaves its step lines
        cmd = ["stdbuf", "-oL", *cmd]
    log = folder / "llmc_train.log"
    code = run_logged(cmd, log, min(LLMC_RUN_LIMIT_S, deadline - time.monotonic()), cwd=checkout, env=env)
    steps = peers_llmc.parse_steps(log.read_text(errors="replace"))
    figures = peers_llmc.median_step(steps, sizes.total_batch, sizes.skip)
    facts.update(figures or {}, log="peers/llmc_train.log")
    if code is None:
        return peer_row(name, "timed out", f"stopped at the time limit after {len(steps)} steps", sizes, **facts)
    if code != 0:
        return peer_row(name, "failed", f"train_gpt2cu exited {code}: {last_line(log)}", sizes, **facts)
    if figures is None:
        return peer_row(name, "failed", f"no step lines after the first {sizes.skip} in llmc_train.log "
                        f"(llm.c's output format changed?)", sizes, **facts)
    return peer_row(name, "ok", "", sizes, **facts)


# ---- transformers ------------------------------------------------------------------------------

def transformers_peer(train_file: Path, sizes: PeerSizes, folder: Path, deadline: float, smoke: bool) -> dict:
    name = "transformers"
    try:
        import transformers
    except ImportError:
        return peer_row(name, "skipped", "transformers is not installed (pip install transformers)", sizes)
    late = too_late(name, deadline, smoke, sizes)
    if late:
        return late
    result_file, log = folder / "transformers.json", folder / "transformers.log"
    cmd = [sys.executable, "-m", "gpt2.benchmark.peers_hf", "--tokens", str(train_file), "--out", str(result_file),
           "--batch-size", str(sizes.batch_size), "--seq-len", str(sizes.seq_len),
           "--total-batch", str(sizes.total_batch), "--steps", str(sizes.steps), "--skip", str(sizes.skip)]
    cmd += ["--device", "cpu", "--no-compile", "--tiny"] if smoke else ["--device", "cuda"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error")
    if smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    code = run_logged(cmd, log, min(HF_LIMIT_S, deadline - time.monotonic()), cwd=REPO, env=env)
    facts = {"transformers": transformers.__version__, "log": "peers/transformers.log"}
    if code is None:
        return peer_row(name, "timed out", "stopped at the time limit (see peers/transformers.log)", sizes, **facts)
    if code != 0 or not result_file.is_file():
        return peer_row(name, "failed", f"exited {code}: {last_line(log)}", sizes, **facts)
    result = json.loads(result_file.read_text())
    figures = {k: result[k] for k in ("ms_per_step", "tokens_per_sec", "steps_timed", "loss_first", "loss_last",
                                      "attn_implementation", "compiled", "autocast", "fused_adamw")}
    return peer_row(name, "ok", "", sizes, **facts, **figures)


# ---- the phase ------------------------------------------------------------------------------------

def shakespeare_tokens(data: Optional[str]):
    """The project's GPT-2 tokens of Tiny Shakespeare (--data, else the download cache)."""
    from omegaconf import OmegaConf

    from gpt2.config import DataConfig
    from gpt2.data.batches import load_tokens

    cfg = OmegaConf.structured(DataConfig(path=data))
    return load_tokens(cfg), cfg.val_fraction


def run_peers(bench, llmc: Optional[Path], ours: Optional[dict], table_reserve_s: float = 10) -> Optional[dict]:
    """The phase: llm.c, then transformers, each under its own limit inside what bench has left."""
    if not bench.fits("peers", 20 if bench.smoke else HF_RESERVE_S):
        return None
    t0 = time.monotonic()
    deadline = t0 + bench.left() - table_reserve_s
    sizes = SMOKE_SIZES if bench.smoke else GPU_SIZES
    folder = bench.out / "peers"
    folder.mkdir(exist_ok=True)
    capability = (bench.facts.get("gpu") or {}).get("capability")
    with tempfile.TemporaryDirectory(prefix="gpt2_peers_") as tmp:  # 700 kB that bench.tar.gz need not carry
        train_file, val_file = Path(tmp) / "tiny_shakespeare_train.bin", Path(tmp) / "tiny_shakespeare_val.bin"
        try:
            tokens, val_fraction = shakespeare_tokens(bench.data)
            train, val = peers_llmc.split_for_llmc(tokens, val_fraction, sizes.batch_size * sizes.seq_len + 1)
            peers_llmc.write_token_file(train_file, train)
            peers_llmc.write_token_file(val_file, val)
        except (UsageError, ValueError, OSError) as e:
            rows = [peer_row(p, "failed", f"no token files: {e}", sizes) for p in ("llm.c", "transformers")]
        else:
            hf_reserve = 20 if bench.smoke else HF_RESERVE_S
            rows = [llmc_peer(llmc, train_file, val_file, sizes, folder, deadline - hf_reserve, capability,
                              need_nvcc=not bench.smoke),
                    transformers_peer(train_file, sizes, folder, deadline, bench.smoke)]
    for row in rows:
        row["ours_over_peer"] = ours_over_peer(ours, row)
    result = {"sizes": asdict(sizes), "smoke": bench.smoke, "ours": ours, "peers": rows}
    (bench.out / "peers.json").write_text(json.dumps(result, indent=2) + "\n")
    status = "ok" if all(r["status"] in ("ok", "skipped") for r in rows) else "partial"
    bench.record("peers", status, time.monotonic() - t0, "; ".join(map(_summary, rows)))
    return result


def _summary(row: dict) -> str:
    """A row in the phase's one-line detail: "llm.c ok 1121.6 ms/step, ours/peer 1.11x"."""
    text = f"{row['peer']} {row['status']}"
    if row["ms_per_step"]:
        text += f" {row['ms_per_step']:.1f} ms/step"
    if row["ours_over_peer"]:
        text += f", ours/peer {row['ours_over_peer']:.2f}x"
    return text + (f" ({row['reason']})" if row["reason"] else "")
