"""Token shards: build-nanogpt's on-disk format, and a loader that trains from a folder of them.

A shard is a NumPy `.npy` file of uint16 GPT-2 token ids, named `{prefix}_{split}_{index:06d}.npy`
(`edufineweb_val_000000.npy`, `edufineweb_train_000001.npy`, ...): shard 0 is the validation split, the
rest are for training, and every document starts with <|endoftext|> (50256). Shards written by
`python -m gpt2.prepare` and by build-nanogpt's fineweb.py are interchangeable.

ShardLoader reads the train shards as one stream, in index order: a batch may start in one shard and end
in the next, so no token is dropped at a shard boundary or read twice in an epoch, and its position
(shard name and offset) goes into the checkpoint so a resumed run continues at the same token.
"""

import bisect
import logging
import re
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from gpt2.files import atomic_write_bytes
from gpt2.errors import UsageError
from gpt2.model.gpt import GPT2_VOCAB_SIZE

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "edufineweb"
PREPARE_HINT = "python -m gpt2.prepare fineweb_edu --out {dir}"


def shard_name(prefix: str, index: int) -> str:
    """build-nanogpt's file name: shard 0 is validation, every later one training."""
    split = "val" if index == 0 else "train"
    return f"{prefix}_{split}_{index:06d}.npy"


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """A uint16 .npy file, written atomically (a killed run never leaves half a shard under the real name)."""
    tokens = np.ascontiguousarray(tokens, dtype=np.uint16)
    atomic_write_bytes(Path(path), lambda f: np.save(f, tokens, allow_pickle=False))


def _remake(path: Path) -> str:
    return f"delete it and run `{PREPARE_HINT.format(dir=Path(path).parent)}` again to remake it"


def _npy_layout(path: Path):
    """(dtype, shape, bytes the header and data take) from a .npy file's header; ValueError if it has none."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0  # 3.0 differs only in how field names are encoded
        shape, _, dtype = read_header(f)
        return dtype, shape, f.tell() + dtype.itemsize * int(np.prod(shape))


def read_shard(path: Path) -> np.ndarray:
    """The shard's tokens, memory-mapped (nothing is read until used); a one-line error for a file that is
    not a whole 1-D uint16 .npy array: not .npy at all, cut short, longer than its header says, or another dtype."""
    path, size = Path(path), None
    try:
        size = path.stat().st_size
        dtype, shape, expected_size = _npy_layout(path)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        reason = "the file is empty" if size == 0 else reason
        raise UsageError(f"{path} is not a readable .npy token shard ({reason}); {_remake(path)}") from None
    if len(shape) != 1 or dtype != np.uint16:
        raise UsageError(f"{path} holds a {dtype} array of shape {shape}, not 1-D uint16 GPT-2 tokens; "
                         f"{_remake(path)}")
    if size != expected_size:  # np.load would refuse a short file with "mmap length ..." and ignore a long one
        state = "is cut short" if size < expected_size else "is longer than its header says"
        raise UsageError(f"{path} {state}: {size:,} bytes, but its header's {shape[0]:,} tokens take "
                         f"{expected_size:,}; {_remake(path)}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not a readable .npy token shard ({str(e).splitlines()[0]}); "
                         f"{_remake(path)}") from None


def check_token_ids(tokens: np.ndarray, where, vocab_size: int = GPT2_VOCAB_SIZE) -> None:
    """Refuse a shard holding an id the model has no embedding for: it would fail hours later, at its batch,
    as an IndexError naming nothing. One vectorised pass (a max over the memory map)."""
    if len(tokens) == 0 or int(tokens.max()) < vocab_size:
        return
    outside = tokens >= vocab_size  # only on failure: where, and how many
    first = int(np.argmax(outside))
    more = int(np.count_nonzero(outside)) - 1
    raise UsageError(f"{where} holds token id {int(tokens[first]):,} at position {first:,}"
                     + (f" (and {more:,} more)" if more else "") + f", outside the model's vocabulary of "
                     f"{vocab_size:,} GPT-2 ids: the shard was made with another tokenizer, or is damaged; "
                     f"{_remake(where)}")


def find_shards(shards_dir, prefix: str = DEFAULT_PREFIX) -> dict:
    """{'val': [paths], 'train': [paths]} in index order; a one-line error when there is nothing to train on."""
    folder = Path(shards_dir).expanduser()
    hint = PREPARE_HINT.format(dir=shards_dir)
    where = f"data.shards_dir={shards_dir}"
    if not folder.is_dir():
        raise UsageError(f"{where}: no such folder; make the shards first with `{hint}` (about 20 GB for "
                         f"FineWeb-Edu sample-10BT; --max-shards 3 for a first try)")
    pattern = re.compile(rf"^{re.escape(prefix)}_(val|train)_(\d{{6}})\.npy$")
    found = {"val": [], "train": []}
    for path in folder.iterdir():
        m = pattern.match(path.name)
        if m:
            found[m.group(1)].append((int(m.group(2)), path))
    if not found["train"]:
        extra = f" (and no {prefix}_val_*.npy)" if not found["val"] else ""
        raise UsageError(f"{where} holds no {prefix}_train_*.npy shards{extra}; make them with `{hint}`")
    if not found["val"]:
        raise UsageError(f"{where} holds no {prefix}_val_*.npy shard to validate on; make the shards with `{hint}`")
    return {split: [p for _, p in sorted(items)] for split, items in found.items()}


class ShardLoader:
    """Consecutive (B, T) batches from a sequence of shards read as one stream, shared out between ranks.

    The same contract as data.TokenLoader: a counter shared by all ranks, next_chunk, advances by world_size
    per call and rank r reads chunk next_chunk + r, chunk g being stream tokens [g*B*T, (g+1)*B*T + 1). So
    W ranks read together exactly the chunks one process reads in W calls, each token once per epoch (all
    but the last < B*T tokens of the stream), across shard boundaries.
    """

    def __init__(self, shards: Sequence, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 names: Optional[List[str]] = None, vocab_size: int = GPT2_VOCAB_SIZE):
        """`shards`: paths of .npy shards, or 1-D token arrays (then `names` labels them in the state).
        Every shard is checked now (its file, and ids < vocab_size), not at its batch hours later."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        arrays = [read_shard(s) if isinstance(s, (str, Path)) else np.asarray(s) for s in shards]
        names = list(names) if names is not None else [
            Path(s).name if isinstance(s, (str, Path)) else f"shard{i}" for i, s in enumerate(shards)]
        for shard, array, name in zip(shards, arrays, names):
            check_token_ids(array, Path(shard) if isinstance(shard, (str, Path)) else Path(name), vocab_size)
        kept = [(a, n) for a, n in zip(arrays, names) if len(a)]  # an empty shard holds nothing to read
        self.shards, self.names = [a for a, _ in kept], [n for _, n in kept]
        self.starts = [0]  # stream offset of each shard's first token, then the stream's length
        for a in self.shards:
            self.starts.append(self.starts[-1] + len(a))
        self.n_tokens = self.starts[-1]
        self.B, self.T = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.n_chunks = (self.n_tokens - 1) // (batch_size * seq_len)
        if self.n_chunks < 1:
            raise UsageError(
                f"the train shards hold {self.n_tokens:,} tokens, fewer than train.batch_size * train.seq_len + 1 "
                f"= {batch_size * seq_len + 1:,}; lower train.batch_size or train.seq_len, or prepare more shards")
        self.next_chunk = 0

    def read(self, start: int, count: int) -> np.ndarray:
        """Stream tokens [start, start + count) as one int64 array, gathered from as many shards as they span."""
        pieces = []
        k = bisect.bisect_right(self.starts, start) - 1
        while count > 0:
            offset = start - self.starts[k]
            piece = self.shards[k][offset:offset + count]
            pieces.append(piece)
            start, count, k = start + len(piece), count - len(piece), k + 1
        return np.concatenate(pieces).astype(np.int64) if len(pieces) > 1 else pieces[0].astype(np.int64)

    def next_batch(self):
        """x, y: (B, T) int64 CPU tensors, y[i, t] = the token after x[i, t] (possibly in the next shard)."""
        B, T = self.B, self.T
        chunk = (self.next_chunk + self.rank) % self.n_chunks
        buf = torch.from_numpy(self.read(chunk * B * T, B * T + 1))
        self.next_chunk = (self.next_chunk + self.world_size) % self.n_chunks  # wrap: another epoch
        return buf[:-1].view(B, T), buf[1:].view(B, T)

    def position(self, chunk: Optional[int] = None) -> tuple:
        """(shard name, offset in it) of the first token of `chunk` (default: the next one rank 0 reads)."""
        start = (self.next_chunk if chunk is None else chunk) * self.B * self.T
        k = bisect.bisect_right(self.starts, start) - 1
        return self.names[k], start - self.starts[k]

    def state_dict(self) -> dict:
        shard, position = self.position()
        return {"next_chunk": self.next_chunk, "shard": shard, "position": position,
                "tokens_per_chunk": self.B * self.T}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved token: found by shard name and offset (so shards added since, at the end, do
        not move it), else by the saved chunk counter."""
        chunk_tokens = self.B * self.T
        if state.get("shard") in self.names:
            start = self.starts[self.names.index(state["shard"])] + int(state["position"])
        else:
            if "shard" in state:
                log.warning(f"the checkpoint's data position is in shard {state['shard']}, which is not among the "
                            f"train shards now; continuing from its batch counter instead")
            start = int(state["next_chunk"]) * int(state.get("tokens_per_chunk", chunk_tokens))
        if start % chunk_tokens:
            log.warning(f"the checkpoint's data position ({start:,} tokens into the train shards) is not a multiple "
                        f"of B*T = {chunk_tokens:,} (B or T changed): continuing at the next whole batch")
        self.next_chunk = -(-start // chunk_tokens) % self.n_chunks


def open_shards(shards_dir, prefix: str, batch_size: int, seq_len: int, rank: int, world_size: int,
                vocab_size: int = GPT2_VOCAB_SIZE):
    """(ShardLoader over the train shards, the val shard's tokens) for a run with data.shards_dir; every
    shard's ids are checked against `vocab_size` (the ids the model embeds) before the first step."""
    found = find_shards(shards_dir, prefix)
    loader = ShardLoader(found["train"], batch_size, seq_len, rank, world_size, vocab_size=vocab_size)
    val_tokens = read_shard(found["val"][0])  # validation reads the first micro-batches of it, the same each time
    check_token_ids(val_tokens, found["val"][0], vocab_size)
    if rank == 0:
        log.info(f"data: {len(loader.shards)} train shard(s), {loader.n_tokens:,} tokens, and "
                 f"{found['val'][0].name} ({len(val_tokens):,} tokens) in {shards_dir}")
    return loader, val_tokens
