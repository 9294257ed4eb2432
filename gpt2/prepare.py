"""Turn a text data set into GPT-2 token shards, the files build-nanogpt's fineweb.py writes.

    python -m gpt2.prepare fineweb_edu                              # FineWeb-Edu sample-10BT, ~100 shards, ~20 GB
    python -m gpt2.prepare fineweb_edu --max-shards 3               # the first 300M tokens, for a first try
    python -m gpt2.prepare fineweb_edu --source ~/fineweb-parquet/  # local parquet / JSON-lines files (offline)

Documents stream in (Hugging Face `datasets` for a hub name, or local .parquet / .jsonl[.gz] files with a
`text` column), are tokenized in parallel, each prefixed with <|endoftext|> (50256), and cut into uint16
shards of exactly --shard-tokens tokens, the last one partial; shard 0 is the validation split. Each shard
is written atomically and recorded in `{prefix}_manifest.json` with the document it stopped in, so a
re-run skips the finished shards (re-reading, not re-tokenizing, their documents) and carries on. The
manifest also records the local source files' names, sizes and sha256: a re-run after they changed is
refused (it would cut the documents differently), and --restart starts over.
"""

import argparse
import functools
import json
import logging
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from gpt2 import tokenizer
from gpt2.files import atomic_write_bytes, cache_root
from gpt2.errors import UsageError, command
from gpt2.data.shards import read_shard, shard_name, write_shard
from gpt2.data.sources import changes, fingerprint, local_files, local_root, open_documents

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
SHARD_TOKENS = 10**8


def cache_dir() -> Path:
    """The project's cache folder, as data.cache_dir resolves it (GPT2_SPEEDRUN_CACHE or ~/.cache/gpt2-speedrun)."""
    return cache_root()


def default_out(dataset: str) -> Path:
    return cache_dir() / DATASETS[dataset].folder


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


START_OVER = ("run again with --restart (deletes the {prefix} shards and manifest in that folder), or choose "
              "another --out")


def _clear_shards(out: Path, prefix: str) -> None:
    """--restart: delete this prefix's shards and manifest in `out`, and nothing else there."""
    pattern = re.compile(rf"^{re.escape(prefix)}_(val|train)_\d{{6}}\.npy$")
    doomed = [p for p in out.iterdir() if pattern.match(p.name)] if out.is_dir() else []
    for path in doomed + [_manifest_path(out, prefix)]:
        path.unlink(missing_ok=True)
    if doomed:
        log.info(f"--restart: deleted {len(doomed)} {prefix} shard(s) and the manifest in {out}")


def _start_or_resume(out: Path, prefix: str, settings: dict, sources: Optional[Callable[[list], list]],
                     restart: bool) -> dict:
    """The manifest to go on with: the finished shards of `out`'s manifest when it was made with the same
    settings from the same source files (`sources(recorded)` fingerprints them now), else a refusal; with
    `restart`, an empty one in a cleared folder. Nothing is written or deleted before a refusal."""
    manifest_path = _manifest_path(out, prefix)
    start_over = START_OVER.format(prefix=prefix)
    saved = None
    if manifest_path.is_file() and not restart:
        try:
            saved = json.loads(manifest_path.read_text())
        except ValueError:
            pass
        if not isinstance(saved, dict) or saved.get("settings") != settings:
            recorded = saved.get("settings") if isinstance(saved, dict) else None
            raise UsageError(f"--out {out} holds shards made with other settings ({manifest_path.name}: "
                             f"{recorded}); {start_over}")
    elif not restart and out.is_dir() and any(out.glob(f"{prefix}_*_*.npy")):
        raise UsageError(f"--out {out} holds {prefix} shards but no {manifest_path.name} (made by another tool?), "
                         f"so there is nothing to resume from; {start_over}")
    recorded_files = saved.get("source_files") if saved else None
    files = sources(recorded_files or []) if sources else None
    if saved and files is not None:
        changed = changes(recorded_files, files) if recorded_files is not None else None
        if changed:
            raise UsageError(f"the source changed since the shards in --out {out} were made ({changed}), so "
                             f"resuming would move documents between shards, and between validation and training; "
                             f"{start_over}")
        if recorded_files is None:
            log.warning(f"{manifest_path.name} records no source files (an older manifest): resuming without "
                        f"checking that the source is unchanged")
    if restart:
        _clear_shards(out, prefix)
    manifest = {"settings": settings, "source_files": files, "shards": [], "complete": False}
    if saved:
        manifest["shards"] = _finished_shards(out, saved)
        manifest["complete"] = saved.get("complete", False) and len(manifest["shards"]) == len(saved["shards"])
    return manifest


def write_shards(documents, out, *, prefix: str, shard_tokens: int = SHARD_TOKENS, max_shards: Optional[int] = None,
                 workers: int = 0, settings: Optional[dict] = None, approx_tokens: Optional[int] = None,
                 progress: Optional[bool] = None, sources: Optional[Callable[[list], list]] = None,
                 restart: bool = False) -> dict:
    """Tokenize `documents` (an iterable of texts, or a callable making one) into shards in `out`, resuming
    as _start_or_resume allows; `workers` > 1 tokenizes in that many processes (0 or 1: in this one). Returns
    the manifest: settings, source_files, shards (file, tokens, where the next shard starts: next_doc,
    next_offset) and complete."""
    from tqdm import tqdm

    for flag, value in (("--shard-tokens", shard_tokens), ("--max-shards", max_shards)):
        if value is not None and value < 1:
            raise UsageError(f"{flag}={value} must be positive")
    out = Path(out).expanduser()
    settings = {**(settings or {}), "prefix": prefix, "shard_tokens": shard_tokens, "encoding": tokenizer.ENCODING}
    manifest_path = _manifest_path(out, prefix)
    manifest = _start_or_resume(out, prefix, settings, sources, restart)
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
    tokens_iter, pool = _tokenized(_skipping(texts, skip_docs), workers)

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


def _tokenized(texts, workers: int):
    """(the documents' tokens, in order; the pool making them, or None when this process does)."""
    if workers <= 1:
        return map(encode_document, texts), None
    pool = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None).Pool(
        workers, initializer=_start_worker)
    return pool.imap(encode_document, texts, chunksize=16), pool


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
            text_field: str = "text", progress: Optional[bool] = None, restart: bool = False) -> dict:
    """Shards of `dataset` (a key of DATASETS) from `source` (its hub name by default) into `out`; `restart`
    deletes the shards already in `out` and starts over."""
    spec = DATASETS[dataset]
    source = source or spec.hub_name
    root = local_root(source)
    config = None if root else (config if config is not None else
                                spec.hub_config if source == spec.hub_name else None)
    tokenizer.get_tokenizer()  # a missing vocabulary is a one-line error now, not in a worker later
    out = Path(out).expanduser() if out else default_out(dataset)
    settings = {"source": str(root) if root else source, "config": config, "text_field": text_field}
    # a hub data set has no files here to fingerprint: its name and config are what the manifest records
    sources = functools.partial(fingerprint, local_files(root), root) if root else None
    return write_shards(lambda: open_documents(source, config, text_field), out, prefix=spec.prefix,
                        shard_tokens=shard_tokens, max_shards=max_shards, workers=workers, settings=settings,
                        approx_tokens=spec.approx_tokens if source == spec.hub_name else None, progress=progress,
                        sources=sources, restart=restart)


@command(interrupted="interrupted: the finished shards are kept; run the same command again to continue")
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
    p.add_argument("--restart", action="store_true",
                   help="delete the shards and manifest already in --out and start over (a run resumes by default)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    manifest = prepare(args.dataset, args.source, args.out, args.shard_tokens, args.max_shards, args.workers,
                       args.config, args.text_field, restart=args.restart)
    n = len(manifest["shards"])
    out = Path(args.out).expanduser() if args.out else default_out(args.dataset)
    print(f"{out}: {n} shard(s), {sum(s['tokens'] for s in manifest['shards']):,} tokens"
          + ("" if manifest["complete"] else " (not finished: run the same command again to continue)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
