"""llm.c (karpathy/llm.c, `train_gpt2cu`) as a peer: its token files, its build, its arguments, its output.

Read from llm.c commit f1e2ace651495b74ae22d45d1723443fd00ecd3a (2025-05-10): the Makefile, train_gpt2.cu's
argument loop and per-step printf, llmc/dataloader.h and dev/data/data_common.py `write_datafile`.
Nothing here runs anything: gpt2/benchmark/peers.py builds and runs, this module says what to write and how to read.
"""

import os
import re
import statistics
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

# dev/data/data_common.py write_datafile, "gpt-2": 256 int32 of header, then the ids as uint16
TOKEN_FILE_MAGIC = 20240520
TOKEN_FILE_VERSION = 1
HEADER_INTS = 256

# train_gpt2.cu: printf0("step %4d/%d | loss %7.6f (%+.2fz)| norm %6.4f (%+.2fz)| lr %.2e | %.2f ms |
# %.1f%% bf16 MFU | %.0f tok/s\n"). The z-scores print as "+nan" before the detector has data, the MFU as
# -100.0 on a GPU it does not know; spacing is matched loosely so that a reformatted line still parses
STEP_LINE = re.compile(
    r"^\s*step\s+(?P<step>\d+)\s*/\s*(?P<total>\d+)\s*\|"
    r"\s*loss\s+(?P<loss>\S+?)\s*(?:\([^)]*\))?\s*\|"
    r"\s*norm\s+(?P<norm>\S+?)\s*(?:\([^)]*\))?\s*\|"
    r"\s*lr\s+(?P<lr>\S+)\s*\|"
    r"\s*(?P<ms>[\d.]+)\s*ms\s*"
    r"(?:\|\s*(?P<mfu>-?[\d.]+)\s*%\s*\w*\s*MFU\s*)?"
    r"(?:\|\s*(?P<tok_s>[\d.]+)\s*tok/s)?", re.IGNORECASE)


# ---- token files -----------------------------------------------------------------------------------

def write_token_file(path: Path, tokens: np.ndarray) -> None:
    """One llm.c token file: what write_datafile(filename, toks, "gpt-2") writes."""
    if not 0 < len(tokens) < 2**31:
        raise ValueError(f"an llm.c token file holds 1 to 2**31-1 tokens, not {len(tokens):,}")
    if int(np.max(tokens)) >= 2**16:
        raise ValueError("GPT-2 token ids must fit uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = TOKEN_FILE_MAGIC, TOKEN_FILE_VERSION, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def read_token_file(path: Path) -> np.ndarray:
    """The uint16 ids of an llm.c token file, checked as llmc/dataloader.h checks them."""
    data = Path(path).read_bytes()
    if len(data) < HEADER_INTS * 4:
        raise ValueError(f"{path}: {len(data)} bytes, shorter than the {HEADER_INTS * 4}-byte header")
    magic, version, count = np.frombuffer(data, dtype="<i4", count=3)
    if magic != TOKEN_FILE_MAGIC or version != TOKEN_FILE_VERSION:
        raise ValueError(f"{path}: magic {magic}, version {version}; an llm.c GPT-2 token file has "
                         f"{TOKEN_FILE_MAGIC}, {TOKEN_FILE_VERSION}")
    if len(data) != HEADER_INTS * 4 + 2 * count:
        raise ValueError(f"{path}: the header says {count:,} tokens, the file holds {(len(data) - 1024) / 2:,.0f}")
    return np.frombuffer(data, dtype="<u2", offset=HEADER_INTS * 4)


def split_for_llmc(tokens: np.ndarray, val_fraction: float, min_tokens: int) -> tuple:
    """(train, val) ids: the project's split, except that llm.c's loader needs B*T+1 tokens in every file,
    more than a 10 % validation split of Tiny Shakespeare holds at B=64, T=1024; then val is the last
    min_tokens ids (overlapping train: the runs measure speed, validation is switched off)."""
    n_train = int(len(tokens) * (1.0 - val_fraction))
    train, val = tokens[:n_train], tokens[n_train:]
    if len(train) < min_tokens:
        raise ValueError(f"the training split holds {len(train):,} tokens; llm.c needs at least B*T+1 = "
                         f"{min_tokens:,}: give more text (--data)")
    return train, (val if len(val) >= min_tokens else tokens[-min_tokens:])


# ---- the build -------------------------------------------------------------------------------------

def find_cudnn_frontend(checkout: Path) -> Optional[Path]:
    """The cuDNN frontend headers where llm.c's Makefile looks (or CUDNN_FRONTEND_PATH); None: build without."""
    candidates = [os.environ.get("CUDNN_FRONTEND_PATH"), checkout / "cudnn-frontend" / "include",
                  Path.home() / "cudnn-frontend" / "include"]
    for folder in candidates:
        if folder and (Path(folder) / "cudnn_frontend.h").is_file():
            return Path(folder).resolve()
    return None


def make_command(capability: Optional[Sequence[int]], cudnn_frontend: Optional[Path]) -> List[str]:
    """`make train_gpt2cu` for one GPU. The Makefile's own query of the compute capability never fires
    (its `$(which ...)` is not a shell call), so the card's is passed; NCCL and MPI are switched off:
    a build that finds NCCL but not MPI stops at start-up ("MPI support is disabled")."""
    cmd = ["make", "train_gpt2cu", "NO_MULTI_GPU=1", "NO_USE_MPI=1"]
    cmd += ["USE_CUDNN=1", f"CUDNN_FRONTEND_PATH={cudnn_frontend}"] if cudnn_frontend else ["USE_CUDNN=0"]
    if capability:
        cmd.append(f"GPU_COMPUTE_CAPABILITY={capability[0]}{capability[1]}")
    return cmd


# ---- the run ---------------------------------------------------------------------------------------

def train_args(train_file: Path, val_file: Path, batch_size: int, seq_len: int, total_batch: int,
               steps: int) -> List[str]:
    """train_gpt2cu's flags: GPT-2 124M from random init (-e d12), no log folder (-o unset, so no
    checkpoints either: -n 0), no sampling (-s 0), and validation only where llm.c always does it (steps 0
    and last, since -v is beyond the run) on one batch (-m 1). The optimizer as the gpt3-optim stage:
    LR 6e-4, 10 warm-up steps, cosine to 0.1 of it, weight decay 0.1 (betas 0.9/0.95 and clip 1.0 are
    llm.c's fixed values)."""
    flags = {"-i": train_file, "-j": val_file, "-e": "d12", "-b": batch_size, "-t": seq_len, "-d": total_batch,
             "-x": steps, "-v": steps + 1000, "-m": 1, "-s": 0, "-n": 0, "-h": 0,
             "-l": "0.0006", "-u": 10, "-q": "0.1", "-c": "0.1"}
    return [str(a) for flag, value in flags.items() for a in (flag, value)]


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # "-nan" and the like
        return float("nan")


def parse_steps(output: str) -> List[dict]:
    """Every per-step line of train_gpt2cu's output: step, total, loss, norm, lr, ms, mfu, tok_s."""
    steps = []
    for line in output.splitlines():
        m = STEP_LINE.match(line)
        if m:
            steps.append({"step": int(m["step"]), "total": int(m["total"]), "loss": _float(m["loss"]),
                          "norm": _float(m["norm"]), "lr": _float(m["lr"]), "ms": float(m["ms"]),
                          "mfu": _float(m["mfu"]) / 100 if m["mfu"] else None,
                          "tok_s": float(m["tok_s"]) if m["tok_s"] else None})
    return steps


def median_step(steps: List[dict], tokens_per_step: int, skip: int) -> Optional[dict]:
    """ms/step: the median after the first `skip` steps (cuBLAS set-up, allocations); tok/s from it, not
    llm.c's printed tok/s (a moving average from step 2 on). None: no step after the skipped ones."""
    timed = [s for s in steps if s["step"] > skip]
    if not timed:
        return None
    ms = statistics.median(s["ms"] for s in timed)
    mfus = [s["mfu"] for s in timed if s["mfu"] is not None and s["mfu"] >= 0]
    return {"ms_per_step": ms, "tokens_per_sec": tokens_per_step / (ms / 1000), "steps_timed": len(timed),
            "mfu": statistics.median(mfus) if mfus else None,
            "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"]}
