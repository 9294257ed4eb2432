"""HellaSwag (Zellers et al., 2019), scored as build-nanogpt's hellaswag.py scores it ("completion style").

Each row is a context and 4 endings. The model reads context tokens + the tokens of " " + ending for each
ending; the loss is summed over the ending tokens only. `acc` picks the ending with the lowest summed loss,
`acc_norm` the lowest mean loss per token. GPT-2 124M scores acc 0.2859, acc_norm 0.2955 on the 10,042
validation rows this way (build-nanogpt); the Eleuther harness's multiple-choice numbers differ.

The validation file is downloaded once into the cache (`$GPT2_SPEEDRUN_CACHE/hellaswag/`, else
`~/.cache/gpt2-speedrun/hellaswag/`) and checked against its git blob id in rowanz/hellaswag; offline,
pass a local copy (`--data FILE` / `train.hellaswag_data=FILE`).
"""

import contextlib
import functools
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import List, Optional

import torch
from torch.nn import functional as F

from gpt2 import tokenizer
from gpt2.files import atomic_write_bytes, cache_root, download
from gpt2.errors import UsageError

log = logging.getLogger("gpt2.evaluation.hellaswag")

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
# the file's git blob id (sha1 of b"blob <size>\0" + bytes) in rowanz/hellaswag: `git ls-tree HEAD data/` shows it
GIT_BLOB_SHA1 = "0f5ee25d72216f12317d5d8a7b92deafa423d81e"
FILE_NAME = "hellaswag_val.jsonl"
VAL_ROWS = 10042
PUBLISHED = {"gpt2 (124M), build-nanogpt scoring": {"acc": 0.2859, "acc_norm": 0.2955},
             "gpt2-xl (1558M), build-nanogpt scoring": {"acc": 0.3842, "acc_norm": 0.4893}}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def cache_path() -> Path:
    return cache_root() / "hellaswag" / FILE_NAME


def _download(dest: Path, flag: str) -> None:
    data = download(URL, "HellaSwag", f"download {FILE_NAME} yourself and pass {flag}")
    got = git_blob_sha1(data)
    if got != GIT_BLOB_SHA1:
        raise UsageError(f"checksum mismatch for {URL}: git blob id {got}, expected {GIT_BLOB_SHA1}; retry, or "
                         f"download {FILE_NAME} yourself and pass {flag}")
    try:
        atomic_write_bytes(dest, lambda f: f.write(data))
    except OSError as e:
        raise UsageError(f"cannot write {dest} ({e.strerror}); set GPT2_SPEEDRUN_CACHE to a writable folder") from None


def data_file(path: Optional[str] = None, flag: str = "--data FILE") -> Path:
    """`path` when given (it must exist); else the cached validation file, downloaded and checked on first use."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UsageError(f"{flag.split()[0]} {path}: no such file; give HellaSwag's {FILE_NAME} (or rows in its "
                             f"format), or leave it out to download it")
        return p
    dest = cache_path()
    if dest.is_file():
        if git_blob_sha1(dest.read_bytes()) == GIT_BLOB_SHA1:
            return dest
        log.warning(f"{dest} does not match its checksum (changed or corrupt): downloading it again")
    _download(dest, flag)
    return dest


ROW_FORMAT = "a JSON object with a ctx string, endings: a list of 4 strings, and a label 0-3"


def _row_problem(row) -> Optional[str]:
    """What makes `row` not a HellaSwag row, or None. A string of 4 characters is not 4 endings, and a
    label of 2.7 or True is not an index: both would be scored without complaint."""
    if not isinstance(row, dict):
        return f"{json.dumps(row)[:40]} is not a JSON object"
    if not isinstance(row.get("ctx"), str):
        return "no ctx string" if "ctx" not in row else f"ctx is {json.dumps(row['ctx'])[:40]}, not a string"
    endings = row.get("endings")
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        return "no endings" if endings is None else f"endings is {json.dumps(endings)[:80]}, not a list of 4 strings"
    label = row.get("label")
    # Hugging Face's copy stores the label as a string ("3"): read that too
    if not (type(label) is int and label in range(4)) and label not in ("0", "1", "2", "3"):
        return f"label is {json.dumps(label)[:40]}, not an integer 0-3"
    return None


def load_examples(path, limit: Optional[int] = None) -> List[dict]:
    """The rows of a HellaSwag .jsonl file ({"ctx", "endings": [4], "label"}, ...), the first `limit` of them,
    each checked as it is read: a one-line error names the file and line of the first bad one."""
    if limit is not None and limit < 1:
        raise UsageError(f"--limit={limit} must be positive (or left out for every row)")
    rows = []
    with open(path, "rb") as f:  # bytes: a bad byte is reported with its line, not as a decoder's traceback
        for n, raw in enumerate(f, 1):
            where = f"{path}, line {n}: not a HellaSwag row"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UsageError(f"{where} (not UTF-8: bad byte {e.start + 1} of the line); HellaSwag's files are "
                                 f"UTF-8 JSON lines") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise UsageError(f"{where} (not JSON); each line must be {ROW_FORMAT}") from None
            problem = _row_problem(row)
            if problem:
                raise UsageError(f"{where} ({problem}); each line must be {ROW_FORMAT}")
            rows.append({**row, "label": int(row["label"])})
            if limit is not None and len(rows) == limit:
                break
    if not rows:
        raise UsageError(f"{path} holds no HellaSwag rows")
    return rows


def render_example(example: dict):
    """4 token rows (context + " " + ending) and their masks (1 on the ending's tokens), and the label."""
    ctx_tokens = tokenizer.encode(example["ctx"])
    rows, masks = [], []
    for ending in example["endings"]:
        end_tokens = tokenizer.encode(" " + ending)  # GPT-2's tokens carry the space before a word
        rows.append(ctx_tokens + end_tokens)
        masks.append([0] * len(ctx_tokens) + [1] * len(end_tokens))
    return rows, masks, int(example["label"])


def _batch(examples: List[dict], max_len: int):
    """(tokens, mask) of shape (4 * len(examples), L), right-padded with zeros, and the labels. A row longer
    than the model's context keeps its last max_len tokens (the ending, and as much context as fits)."""
    rows, masks, labels = [], [], []
    for example in examples:
        r, m, label = render_example(example)
        rows += [row[-max_len:] for row in r]
        masks += [mask[-max_len:] for mask in m]
        labels.append(label)
    width = max(len(r) for r in rows)
    tokens = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, :len(m)] = torch.tensor(m)
    return tokens, mask, torch.tensor(labels)


@torch.no_grad()
def ending_losses(model, examples: List[dict], device, autocast=contextlib.nullcontext):
    """(sum, mean) of the loss over each ending's tokens: two (len(examples), 4) float tensors on the CPU."""
    tokens, mask, _ = _batch(examples, model.config.block_size)
    tokens, mask = tokens.to(device), mask.to(device)
    with autocast():
        logits = model(tokens)[0]
    losses = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    shift_mask = mask[:, 1:].to(losses.dtype).view(len(tokens), -1)  # the loss at t scores token t + 1
    summed = (losses.view(len(tokens), -1) * shift_mask).sum(dim=1)
    mean = summed / shift_mask.sum(dim=1).clamp(min=1)
    return summed.view(-1, 4).cpu(), mean.view(-1, 4).cpu()


@torch.no_grad()
def evaluate(model, examples: List[dict], device, autocast=contextlib.nullcontext, batch_examples: int = 4,
             rank: int = 0, world_size: int = 1, progress: bool = False) -> dict:
    """{"acc", "acc_norm", "n", "correct", "correct_norm"} of `model` on `examples`. With world_size > 1 every
    rank scores every world_size-th row and the counts are summed over ranks (all ranks must call it)."""
    mine = examples[rank::world_size]
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)  # rows, correct (summed loss), correct (mean loss)
    batches = range(0, len(mine), batch_examples)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, unit_scale=batch_examples, unit="row", desc="hellaswag", dynamic_ncols=True)
    try:
        for i in batches:
            chunk = mine[i:i + batch_examples]
            summed, mean = ending_losses(model, chunk, device, autocast)
            labels = torch.tensor([int(e["label"]) for e in chunk])
            counts += torch.tensor([len(chunk), (summed.argmin(1) == labels).sum().item(),
                                    (mean.argmin(1) == labels).sum().item()], dtype=torch.float64)
    finally:
        model.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        counts = counts.to(device)
        torch.distributed.all_reduce(counts)  # sum
        counts = counts.cpu()
    n, correct, correct_norm = (int(c) for c in counts.tolist())
    return {"acc": correct / n if n else math.nan, "acc_norm": correct_norm / n if n else math.nan, "n": n,
            "correct": correct, "correct_norm": correct_norm}


# ---- during training ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _cached_examples(path: Path, limit: Optional[int], sha256: str) -> tuple:
    return tuple(load_examples(path, limit))


def examples_for_training(train_cfg) -> List[dict]:
    """The rows train.hellaswag_every evaluates (train.hellaswag_data / hellaswag_limit), read once per process
    for as long as the file is unchanged (a sweep runs its jobs in one process: an edited file is read again)."""
    path, limit = train_cfg.hellaswag_data, train_cfg.hellaswag_limit  # limit: checked by TrainConfig.check
    found = data_file(str(path) if path else None, "train.hellaswag_data=FILE")
    with open(found, "rb") as f:  # keyed by content: ~20 ms for the 11 MB validation file
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return list(_cached_examples(found.resolve(), limit, digest))


def evaluate_in_run(run, step: int) -> dict:
    """HellaSwag on the run's plain module in its autocast (never the compiled or DDP wrapper: no recompiling,
    no gradient sync), the rows shared among ranks; logged to the console, metrics.jsonl and wandb.
    Returns {"hellaswag_acc_norm", "hellaswag_acc", "hellaswag_n"} for the summary."""
    examples = examples_for_training(run.cfg.train)
    result = evaluate(run.raw_model, examples, run.device, run.autocast, rank=run.ranks.rank,
                      world_size=run.ranks.world_size)
    record = {"step": step, "hellaswag_acc_norm": result["acc_norm"], "hellaswag_acc": result["acc"],
              "hellaswag_n": result["n"]}
    run.record(record, f"step {step:5d} | hellaswag acc_norm {result['acc_norm']:.4f} "
                       f"({result['correct_norm']}/{result['n']}) | acc {result['acc']:.4f}")
    return {k: v for k, v in record.items() if k != "step"}
