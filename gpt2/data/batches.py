"""The data: Tiny Shakespeare (or any local text file) as GPT-2 tokens, and a loader of (B, T) batches.

load_tokens(cfg.data) -> uint16 ids of the whole text; train_val_split() cuts them; TokenLoader serves
consecutive chunks of B*T tokens, shared out between data-parallel ranks, and can resume exactly.
build_data(cfg.data, ...) is what a run calls: the text, or with data.shards_dir a folder of token shards
(FineWeb-Edu, gpt2/data/shards.py), as a train loader and the validation tokens.

The downloaded text and its tokens are cached in data.cache_dir. Every file there is written atomically
(temporary file in the same folder, fsync, os.replace), so an interrupted run never leaves a half file.
Neither can go stale: a token cache is named by the tokenizer and the sha256 of the exact text tokenized
(an edited file is tokenized again, even at the same size and mtime), and a download is checked against
data.sha256 or, without one, cached under a name that carries its url.
"""

import hashlib
import logging
import os
import struct
import urllib.parse
from pathlib import Path

import numpy as np
import torch

from gpt2 import tokenizer
from gpt2.architecture import GPT2_VOCAB_SIZE
from gpt2.config import DataConfig, typed
from gpt2.errors import UsageError
from gpt2.files import atomic_write_bytes, download

log = logging.getLogger(__name__)

DEFAULT_FILE_NAME = "tinyshakespeare.txt"  # the default url ends in the anonymous "input.txt"

# token cache file: 48-byte header, then the ids as little-endian uint16
CACHE_MAGIC = b"GPT2TOK1"
CACHE_HEADER = struct.Struct("<8sQ32s")  # magic, token count, sha256 of the payload bytes


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


# -----------------------------------------------------------------------------
# the source text


def _decode_text(data: bytes, where: str) -> str:
    try:
        text = data.decode("utf-8")  # no newline translation: the tokens depend on the exact bytes
    except UnicodeDecodeError as e:
        raise UsageError(f"{where} is not UTF-8 text (bad byte at offset {e.start}); "
                         f"pass data.path=a UTF-8 text file") from None
    if "\x00" in text:
        raise UsageError(f"{where} looks binary (it holds NUL bytes); pass data.path=a UTF-8 text file")
    return text


def _read_local(path_str: str) -> str:
    path = Path(os.path.expanduser(path_str))
    where = f"data.path={path_str}"
    if not path.is_file():
        raise UsageError(f"{where}: no such file; pass data.path=an existing text file, "
                         f"or leave data.path unset to download {DataConfig.name}")
    data = path.read_bytes()
    if not data:
        raise UsageError(f"{where} is empty; pass data.path=a text file with something to train on")
    return _decode_text(data, where)


def _download(name: str, url: str, dest: Path, sha256) -> bytes:
    """Fetch `url` into `dest`, checked against `sha256` before anything is written."""
    data = download(url, name, "download it yourself and pass data.path=FILE")
    if sha256 and _sha256(data) != sha256:
        raise UsageError(f"checksum mismatch for {url}: got sha256 {_sha256(data)}, expected {sha256} "
                         f"(data.sha256); retry, or download it yourself and pass data.path=FILE")
    try:
        atomic_write_bytes(dest, lambda f: f.write(data))
    except OSError as e:
        raise UsageError(f"cannot write {dest} ({e.strerror}); set data.cache_dir "
                         f"(or GPT2_SPEEDRUN_CACHE) to a writable folder") from None
    return data


def _download_name(url: str, sha256) -> str:
    """The cached copy's file name. With data.sha256 the checksum tells a stale copy from a good one; without
    it the name carries the url's hash, so another url ending in the same name is never served this copy."""
    if url == DataConfig.url:
        return DEFAULT_FILE_NAME
    name = os.path.basename(urllib.parse.urlparse(url).path) or "download.txt"
    if sha256:
        return name
    stem, dot, suffix = name.rpartition(".")
    tag = _sha256(url.encode())[:16]
    return f"{stem}-{tag}.{suffix}" if dot and stem else f"{name}-{tag}"


def _read_downloaded(data_cfg, cache_dir: Path) -> str:
    """The text behind data.url: the cached copy if it is intact, else a fresh download."""
    url, sha256 = data_cfg.url, data_cfg.sha256
    path = cache_dir / _download_name(url, sha256)
    data = None
    if path.is_file():
        data = path.read_bytes()
        if sha256 and _sha256(data) != sha256:
            log.warning("%s does not match data.sha256 (changed or corrupt): downloading it again", path)
            data = None
    if data is None:
        data = _download(data_cfg.name, url, path, sha256)
    return _decode_text(data, f"the download of {url} ({path})")


# -----------------------------------------------------------------------------
# the token cache


def _read_token_cache(path: Path):
    """(tokens, None) for a valid cache file, (None, why) for a bad one, (None, None) when there is none."""
    try:
        with open(path, "rb") as f:
            header = f.read(CACHE_HEADER.size)
            if len(header) < CACHE_HEADER.size:
                return None, "its header is truncated"
            magic, count, checksum = CACHE_HEADER.unpack(header)
            if magic != CACHE_MAGIC:
                return None, "it does not start with the token-cache magic"
            size = os.fstat(f.fileno()).st_size
            if size != CACHE_HEADER.size + 2 * count:
                return None, f"it holds {size} bytes, expected {CACHE_HEADER.size + 2 * count} for {count} tokens"
            tokens = np.fromfile(f, dtype="<u2", count=count)
    except FileNotFoundError:
        return None, None
    if hashlib.sha256(tokens).digest() != checksum:
        return None, "its checksum does not match"
    return tokens.astype(np.uint16, copy=False), None


def _write_token_cache(path: Path, tokens: np.ndarray) -> None:
    payload = tokens.astype("<u2", copy=False).tobytes()
    header = CACHE_HEADER.pack(CACHE_MAGIC, len(tokens), hashlib.sha256(payload).digest())
    try:
        atomic_write_bytes(path, lambda f: f.write(header + payload))
    except OSError as e:  # the tokens are in hand: a read-only cache only costs re-tokenizing next time
        log.warning("could not cache the tokens in %s (%s)", path, e.strerror)


def _tokenize(text: str) -> np.ndarray:
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    assert ids.size == 0 or ids.max() < 2**16, "token ids must fit uint16"
    return ids.astype(np.uint16)


# -----------------------------------------------------------------------------
# the public API


def load_tokens(data_cfg) -> np.ndarray:
    """uint16 GPT-2 token ids of the whole data set (after data.max_chars), tokenized once and cached.
    `data_cfg`: the run's `data` section (a DataConfig, or the composed node of one), checked here too."""
    data_cfg = typed(DataConfig, data_cfg)
    data_cfg.check()
    cache_dir = Path(os.path.expanduser(str(data_cfg.cache_dir)))
    if data_cfg.path:
        text = _read_local(str(data_cfg.path))
    else:
        text = _read_downloaded(data_cfg, cache_dir)
    if data_cfg.max_chars is not None:
        text = text[:data_cfg.max_chars]

    # keyed by the exact text tokenized, so a new file, a new max_chars or an edited text all re-tokenize
    key = _sha256(text.encode("utf-8"))
    cache_path = cache_dir / f"tokens-{tokenizer.ENCODING}-{key}.bin"
    tokens, problem = _read_token_cache(cache_path)
    if tokens is not None:
        return tokens
    if problem:
        log.warning("token cache %s is unusable (%s): tokenizing again", cache_path, problem)
    tokens = _tokenize(text)
    _write_token_cache(cache_path, tokens)
    return tokens


def train_val_split(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The first (1 - val_fraction) of the tokens for training, the rest for validation (views, no copy)."""
    DataConfig.check_val_fraction(val_fraction)
    n_train = int(len(tokens) * (1.0 - val_fraction))
    return tokens[:n_train], tokens[n_train:]


class TokenLoader:
    """Consecutive (B, T) batches, each rank of a data-parallel run taking its own chunk of B*T tokens.

    A counter shared by all ranks, next_chunk, advances by world_size per call and rank r reads chunk
    next_chunk + r. So W ranks read together exactly the chunks one process reads in W calls: a 2-process
    run sees the same data as a 1-process run with twice the gradient accumulation.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.tokens = tokens
        self.B, self.T = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        # chunk g covers tokens [g*B*T, (g+1)*B*T + 1): one extra token for the shifted targets
        self.n_chunks = (len(tokens) - 1) // (batch_size * seq_len)
        if self.n_chunks < 1:
            raise UsageError(
                f"the data split has {len(tokens):,} tokens, fewer than train.batch_size * train.seq_len + 1 = "
                f"{batch_size} * {seq_len} + 1 = {batch_size * seq_len + 1:,}; lower train.batch_size or "
                f"train.seq_len, or use more data (data=tiny_shakespeare, a bigger data.path, data.val_fraction)")
        self.next_chunk = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (B, T) int64 CPU tensors, y[i, t] = the token after x[i, t]."""
        B, T = self.B, self.T
        start = ((self.next_chunk + self.rank) % self.n_chunks) * B * T
        buf = torch.from_numpy(self.tokens[start:start + B * T + 1].astype(np.int64))
        self.next_chunk = (self.next_chunk + self.world_size) % self.n_chunks  # wrap: start another epoch
        return buf[:-1].view(B, T), buf[1:].view(B, T)

    def state_dict(self) -> dict:
        return {"next_chunk": self.next_chunk}

    def load_state_dict(self, state: dict) -> None:
        self.next_chunk = int(state["next_chunk"]) % self.n_chunks


def build_data(data_cfg, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
               vocab_size: int = GPT2_VOCAB_SIZE):
    """(train loader, validation tokens) for a run's `data` section: token shards when data.shards_dir is set
    (gpt2/data/shards.py), else the text split by data.val_fraction.
    `vocab_size`: the ids the model embeds (its tokenizer_vocab_size); a shard holding another is refused."""
    if data_cfg.shards_dir:
        from gpt2.data.shards import open_shards

        return open_shards(str(data_cfg.shards_dir), data_cfg.shards_prefix, batch_size, seq_len, rank, world_size,
                           vocab_size)
    train_tokens, val_tokens = train_val_split(load_tokens(data_cfg), data_cfg.val_fraction)
    return TokenLoader(train_tokens, batch_size, seq_len, rank, world_size), val_tokens
