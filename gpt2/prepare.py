"""Turn a text data set into GPT-2 token shards, the files build-nanogpt's fineweb.py writes.

    python -m gpt2.prepare fineweb_edu                              # FineWeb-Edu sample-10BT, ~100 shards, ~20 GB
    python -m gpt2.prepare fineweb_edu --max-shards 3               # the first 300M tokens, for a first try
    python -m gpt2.prepare fineweb_edu --source ~/fineweb-parquet/  # local parquet / JSON-lines files (offline)

Documents stream in (Hugging Face `datasets` for a hub name, or local .parquet / .jsonl[.gz] files with a
`text` column), are tokenized in parallel, each prefixed with <|endoftext|> (50256), and cut into uint16
shards of exactly --shard-tokens tokens, the last one partial; shard 0 is the validation split. Each shard
is written atomically and recorded in `{prefix}_manifest.json` with the document it stopped in, so a
re-run skips the finished shards (re-reading, not re-tokenizing, their documents) and carries on.
"""

import argparse
import gzip
import json
import logging
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np

from gpt2 import tokenizer
from gpt2.checkpoint import atomic_write_bytes
from gpt2.errors import UsageError
from gpt2.shards import read_shard, shard_name, write_shard

log = logging.getLogger("gpt2.prepare")


@dataclass(frozen=True)
class DatasetSpec:
    hub_name: str  # the default --source
    hub_config: Optional[str]  # `name=` for datasets.load_dataset
    prefix: str  # shard file prefix
    folder: str  # default --out, under the cache folder
    approx_tokens: Optional[int]  # for the progress bar's ETA only


DATASETS = {
    # 9.67M documents; build-nanogpt's 100M-token shards: 1 val + 99 train, the last partial (~10B tokens)
    "fineweb_edu": DatasetSpec("HuggingFaceFW/fineweb-edu", "sample-10BT", "edufineweb", "edu_fineweb10B", 10**10),
}
LOCAL_SUFFIXES = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz")
SHARD_TOKENS = 10**8


def cache_dir() -> Path:
    """The project's cache folder, as data.cache_dir resolves it (GPT2_SPEEDRUN_CACHE or ~/.cache/gpt2-speedrun)."""
    return Path(os.path.expanduser(os.environ.get("GPT2_SPEEDRUN_CACHE", "~/.cache/gpt2-speedrun")))


def default_out(dataset: str) -> Path:
    return cache_dir() / DATASETS[dataset].folder


# ---- documents ------------------------------------------------------------------------------------

def _local_files(path: Path) -> List[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(LOCAL_SUFFIXES))
    if not files:
        raise UsageError(f"--source {path}: the folder holds no {', '.join(LOCAL_SUFFIXES)} files; give a folder "
                         f"or files of parquet / JSON lines with a text column")
    return files


def _read_json_lines(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                yield row[text_field]
            except (ValueError, KeyError, TypeError) as e:
                what = f"no {text_field!r} field" if isinstance(e, (KeyError, TypeError)) else "not JSON"
                raise UsageError(f"--source {path}, line {n}: {what}; each line must be a JSON object with a "
                                 f"{text_field!r} string (--text-field names another)") from None


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq  # comes with `datasets`

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # ArrowInvalid for a file that is not parquet
        raise UsageError(f"--source {path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    if text_field not in parquet.schema_arrow.names:
        raise UsageError(f"--source {path}: no {text_field!r} column (it has {', '.join(parquet.schema_arrow.names)}); "
                         f"--text-field names another")
    for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):
        yield from batch.column(0).to_pylist()


def _read_local(files: List[Path], text_field: str) -> Iterator[str]:
    for path in files:
        yield from (_read_parquet if path.name.endswith(".parquet") else _read_json_lines)(path, text_field)


def _read_hub(name: str, config: Optional[str], text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise UsageError("reading from the Hugging Face hub needs the `datasets` package: pip install datasets "
                         "(or pass --source a local folder of parquet / JSON-lines files)") from None
    try:
        stream = datasets.load_dataset(name, name=config, split="train", streaming=True)
    except Exception as e:  # ConnectionError offline, DatasetNotFoundError, a bad config name, ...
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UsageError(f"could not open {name}" + (f" ({config})" if config else "") + f" on the Hugging Face hub "
                         f"({reason}); check the name and the network, or download the data yourself and pass "
                         f"--source a local folder of parquet / JSON-lines files") from None
    for row in stream:
        yield row[text_field]


def open_documents(source: str, config: Optional[str] = None, text_field: str = "text") -> Iterator[str]:
    """The documents' texts, in a fixed order: local files (a file or a folder, sorted by path) or a hub data set."""
    path = Path(source).expanduser()
    if path.exists():
        return _read_local(_local_files(path), text_field)
    if source.startswith((".", "/", "~")) or source.endswith(LOCAL_SUFFIXES) or source.count("/") > 1:
        raise UsageError(f"--source {source}: no such file or folder; give a local folder or files of parquet / "
                         f"JSON lines, or a Hugging Face data set name (e.g. HuggingFaceFW/fineweb-edu)")
    return _read_hub(source, config, text_field)


# ---- tokens -------------------------------------------------------------------------------------

def encode_document(text: str) -> np.ndarray:
    """<|endoftext|> then the document's tokens, as uint16 (GPT-2 ids all fit: 50256 < 65536)."""
    if not isinstance(text, str):
        raise UsageError(f"a document's text is a {type(text).__name__}, not a string; check --text-field")
    ids = tokenizer.encode(text)
    out = np.empty(len(ids) + 1, dtype=np.uint16)
    out[0] = tokenizer.EOT
    out[1:] = ids
    return out


def _start_worker() -> None:
    tokenizer.get_tokenizer()  # load the vocabulary once per worker, before the first document


# ---- shards ---------------------------------------------------------------------------------------

def _manifest_path(out: Path, prefix: str) -> Path:
    return out / f"{prefix}_manifest.json"


def _write_manifest(path: Path, manifest: dict) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(manifest, indent=1) + "\n").encode()))


def _finished_shards(out: Path, manifest: dict) -> list:
    """The manifest's shards, in order, up to the first one that is missing or not the size it recorded."""
    good = []
    for entry in manifest.get("shards", []):
        path = out / entry["file"]
        try:
            ok = path.is_file() and len(read_shard(path)) == entry["tokens"]
        except UsageError:
            ok = False
        if not ok or entry["file"] != shard_name(manifest["settings"]["prefix"], len(good)):
            break
        good.append(entry)
    return good


def write_shards(documents, out, *, prefix: str, shard_tokens: int = SHARD_TOKENS, max_shards: Optional[int] = None,
                 workers: int = 0, settings: Optional[dict] = None, approx_tokens: Optional[int] = None,
                 progress: Optional[bool] = None) -> dict:
    """Tokenize `documents` (an iterable of texts, or a callable making one) into shards in `out`.

    Resumes from `out`'s manifest when it was made with the same `settings`; `workers` > 1 tokenizes in that
    many processes (0 or 1: in this one). Returns the manifest: settings, shards (file, tokens, where the next
    shard starts: next_doc, next_offset) and complete.
    """
    from tqdm import tqdm

    if shard_tokens < 1:
        raise UsageError(f"--shard-tokens={shard_tokens} must be positive")
    if max_shards is not None and max_shards < 1:
        raise UsageError(f"--max-shards={max_shards} must be positive")
    out = Path(out).expanduser()
    settings = {**(settings or {}), "prefix": prefix, "shard_tokens": shard_tokens, "encoding": tokenizer.ENCODING}
    manifest_path = _manifest_path(out, prefix)
    manifest = {"settings": settings, "shards": [], "complete": False}
    if manifest_path.is_file():
        try:
            saved = json.loads(manifest_path.read_text())
        except ValueError:
            saved = None
        if saved is None or saved.get("settings") != settings:
            raise UsageError(f"--out {out} holds shards made with other settings ({manifest_path.name}: "
                             f"{saved and saved.get('settings')}); choose another --out, or delete that folder to "
                             f"start again")
        manifest["shards"] = _finished_shards(out, saved)
        manifest["complete"] = saved.get("complete", False) and len(manifest["shards"]) == len(saved["shards"])
    elif out.is_dir() and any(out.glob(f"{prefix}_*_*.npy")):
        raise UsageError(f"--out {out} holds {prefix} shards but no {manifest_path.name} (made by another tool?), "
                         f"so there is nothing to resume from; choose another --out, or delete them to start again")
    done = manifest["shards"]
    if manifest["complete"]:
        log.info(f"{out}: all {len(done)} shards are there already ({sum(s['tokens'] for s in done):,} tokens)")
        return manifest
    if max_shards is not None and len(done) >= max_shards:
        log.info(f"{out}: {len(done)} shards are there already (--max-shards {max_shards}); nothing to do")
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    skip_docs, skip_tokens = (done[-1]["next_doc"], done[-1]["next_offset"]) if done else (0, 0)
    if done:
        log.info(f"{out}: {len(done)} shard(s) are there already; continuing at document {skip_docs:,}")

    texts = documents() if callable(documents) else documents
    pool = None
    if workers > 1:
        pool = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None).Pool(
            workers, initializer=_start_worker)
        tokens_iter = pool.imap(encode_document, _skipping(texts, skip_docs), chunksize=16)
    else:
        tokens_iter = map(encode_document, _skipping(texts, skip_docs))

    buf = np.empty(shard_tokens, dtype=np.uint16)
    filled, index, doc = 0, len(done), skip_docs
    written = sum(s["tokens"] for s in done)
    total = max_shards * shard_tokens if max_shards else approx_tokens
    bar = tqdm(total=total, initial=written, unit="tok", unit_scale=True, dynamic_ncols=True, mininterval=1.0,
               desc=f"shard {index}", disable=progress is False if progress is not None else None,
               file=sys.stderr)
    started = time.perf_counter()

    def flush(next_doc: int, next_offset: int) -> None:
        nonlocal filled, index
        name = shard_name(prefix, index)
        write_shard(out / name, buf[:filled])
        done.append({"file": name, "tokens": filled, "next_doc": next_doc, "next_offset": next_offset})
        _write_manifest(manifest_path, manifest)
        rate = (sum(s["tokens"] for s in done) - written) / max(time.perf_counter() - started, 1e-9)
        bar.write(f"wrote {name}: {filled:,} tokens ({rate:,.0f} tok/s)", file=sys.stderr)
        index, filled = index + 1, 0
        bar.set_description(f"shard {index}")

    try:
        for tokens in tokens_iter:
            offset = skip_tokens if doc == skip_docs else 0  # the part of the first document already written
            while offset < len(tokens):
                take = min(shard_tokens - filled, len(tokens) - offset)
                buf[filled:filled + take] = tokens[offset:offset + take]
                filled, offset = filled + take, offset + take
                bar.update(take)
                if filled == shard_tokens:
                    flush(doc + (offset == len(tokens)), offset % len(tokens))
                    if max_shards is not None and index >= max_shards:
                        bar.close()
                        log.info(f"stopped after {index} shards (--max-shards {max_shards}); run again with a "
                                 f"larger --max-shards, or without it, to go on")
                        return manifest
            doc += 1
        if filled:
            flush(doc, 0)
        manifest["complete"] = True
        _write_manifest(manifest_path, manifest)
        bar.close()
        log.info(f"{out}: {len(done)} shards, {sum(s['tokens'] for s in done):,} tokens from {doc:,} documents")
        return manifest
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()


def _skipping(texts, n: int):
    """The texts after the first n (those of finished shards): read, but not tokenized again."""
    for i, text in enumerate(texts):
        if i >= n:
            yield text
        elif i == n - 1:
            log.info(f"skipped the {n:,} documents of the finished shards")


# ---- the command ----------------------------------------------------------------------------------

def prepare(dataset: str, source: Optional[str] = None, out=None, shard_tokens: int = SHARD_TOKENS,
            max_shards: Optional[int] = None, workers: int = 0, config: Optional[str] = None,
            text_field: str = "text", progress: Optional[bool] = None) -> dict:
    """Shards of `dataset` (a key of DATASETS) from `source` (its hub name by default) into `out`."""
    spec = DATASETS[dataset]
    source = source or spec.hub_name
    local = Path(source).expanduser().exists()
    config = None if local else (config if config is not None else
                                 spec.hub_config if source == spec.hub_name else None)
    tokenizer.get_tokenizer()  # a missing vocabulary is a one-line error now, not in a worker later
    out = Path(out).expanduser() if out else default_out(dataset)
    source_id = str(Path(source).expanduser().resolve()) if local else source
    settings = {"source": source_id, "config": config, "text_field": text_field}
    return write_shards(lambda: open_documents(source, config, text_field), out, prefix=spec.prefix,
                        shard_tokens=shard_tokens, max_shards=max_shards, workers=workers, settings=settings,
                        approx_tokens=spec.approx_tokens if source == spec.hub_name else None, progress=progress)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2.prepare", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:5]))
    p.add_argument("dataset", choices=sorted(DATASETS))
    p.add_argument("--source", help="a Hugging Face data set name (default HuggingFaceFW/fineweb-edu), or a local "
                                    "file or folder of .parquet / .jsonl[.gz] files with a text column")
    p.add_argument("--config", help="the hub data set's config (default sample-10BT for the default source)")
    p.add_argument("--out", help="folder for the shards (default $GPT2_SPEEDRUN_CACHE or ~/.cache/gpt2-speedrun, "
                                 "then edu_fineweb10B: what data=fineweb_edu reads)")
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard (default 100,000,000)")
    p.add_argument("--max-shards", type=int, help="stop after this many shards (the val shard counts)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="tokenizer processes (default half the CPUs; 1: in this process)")
    p.add_argument("--text-field", default="text", help="the column holding the text (default text)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        manifest = prepare(args.dataset, args.source, args.out, args.shard_tokens, args.max_shards, args.workers,
                           args.config, args.text_field)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return UsageError.exit_code
    except KeyboardInterrupt:
        print("interrupted: the finished shards are kept; run the same command again to continue", file=sys.stderr)
        return 130
    n = len(manifest["shards"])
    out = Path(args.out).expanduser() if args.out else default_out(args.dataset)
    print(f"{out}: {n} shard(s), {sum(s['tokens'] for s in manifest['shards']):,} tokens"
          + ("" if manifest["complete"] else " (not finished: run the same command again to continue)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
