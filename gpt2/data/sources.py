"""Where `python -m gpt2.prepare` reads documents: local parquet / JSON-lines files, or a Hugging Face data set.

Every document is checked as it is read: a file that is not UTF-8, a .gz cut short, a line that is not a
JSON object with a text string, is a one-line UsageError naming the file and line (parquet: the row).

fingerprint() records each local file's size and sha256 for prepare's resume manifest, so that a resume
after the source folder gained, lost or changed a file is refused instead of silently moving documents
between shards (and between validation and training).
"""

import gzip
import hashlib
import json
import logging
import zlib
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

from gpt2.errors import UsageError

log = logging.getLogger("gpt2.prepare")

LOCAL_SUFFIXES = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz")


# ---- local files ----------------------------------------------------------------------------------

def local_files(path: Path) -> List[Path]:
    """`path` itself, or the source files under the folder `path`, sorted: the documents' order."""
    if path.is_file():
        if not path.name.endswith(LOCAL_SUFFIXES):
            raise UsageError(f"--source {path}: not a {', '.join(LOCAL_SUFFIXES)} file (other compressions, such "
                             f"as .zst, are not read: decompress it, or recompress it with gzip)")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(LOCAL_SUFFIXES))
    if not files:
        raise UsageError(f"--source {path}: the folder holds no {', '.join(LOCAL_SUFFIXES)} files; give a folder "
                         f"or files of parquet / JSON lines with a text column")
    return files


def _json_kind(value) -> str:
    """What a parsed JSON value is, as the file spells it: "a string", "an array", "null", ..."""
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
             dict: "an object"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _text_of_line(raw: bytes, where: str, text_field: str) -> str:
    """The text of one JSON line, or a UsageError saying what is wrong with it."""
    fix = f"each line must be a UTF-8 JSON object with a {text_field!r} string (--text-field names another)"
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UsageError(f"{where}: not UTF-8 (bad byte {e.start + 1} of the line); {fix}") from None
    except ValueError:
        raise UsageError(f"{where}: not JSON; {fix}") from None
    if not isinstance(row, dict):
        raise UsageError(f"{where}: {_json_kind(row)}, not a JSON object; {fix}")
    if text_field not in row:
        raise UsageError(f"{where}: no {text_field!r} field (it has {', '.join(list(row)[:8]) or 'none'}); {fix}")
    if not isinstance(row[text_field], str):
        raise UsageError(f"{where}: {text_field!r} is {_json_kind(row[text_field])}, not a string; {fix}")
    return row[text_field]


def _read_json_lines(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    n = 0
    try:
        with opener(path, "rb") as f:  # bytes: each line decoded here, so a bad byte names its line
            for n, raw in enumerate(f, 1):
                if raw.strip():
                    yield _text_of_line(raw, f"--source {path}, line {n}", text_field)
    except gzip.BadGzipFile:
        raise UsageError(f"--source {path}: not gzip data, despite its name; rename it, or gzip it") from None
    except (EOFError, zlib.error) as e:  # EOFError: the stream ends before its end marker
        what = "ends early" if isinstance(e, EOFError) else f"is corrupt ({e})"
        raise UsageError(f"--source {path}: the gzip data {what} after line {n:,} (an interrupted download?); "
                         f"fetch the file again") from None


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa  # comes with `datasets`
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # ArrowInvalid for a file that is not parquet
        raise UsageError(f"--source {path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise UsageError(f"--source {path}: no {text_field!r} column (it has {', '.join(schema.names)}); "
                         f"--text-field names another")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UsageError(f"--source {path}: the {text_field!r} column holds {kind}, not strings; --text-field "
                         f"names another")
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):
            column = batch.column(0)
            if column.null_count:
                first = row + column.is_null().to_pylist().index(True)
                raise UsageError(f"--source {path}, row {first:,}: {text_field!r} is null, not a string")
            yield from column.to_pylist()
            row += len(column)
    except (OSError, ValueError) as e:  # a damaged row group: ArrowIOError, ArrowInvalid
        raise UsageError(f"--source {path}: unreadable after row {row:,} ({str(e).splitlines()[0]}); fetch the "
                         f"file again") from None


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
    for n, row in enumerate(stream):
        if not isinstance(row.get(text_field), str):
            raise UsageError(f"{name}, row {n:,}: no {text_field!r} string (it has {', '.join(row)}); --text-field "
                             f"names another")
        yield row[text_field]


def open_documents(source: str, config: Optional[str] = None, text_field: str = "text") -> Iterator[str]:
    """The documents' texts, in a fixed order: local files (a file or a folder, sorted by path) or a hub data set."""
    path = Path(source).expanduser()
    if path.exists():
        return _read_local(local_files(path), text_field)
    if source.startswith((".", "/", "~")) or source.endswith(LOCAL_SUFFIXES) or source.count("/") > 1:
        raise UsageError(f"--source {source}: no such file or folder; give a local folder or files of parquet / "
                         f"JSON lines, or a Hugging Face data set name (e.g. HuggingFaceFW/fineweb-edu)")
    return _read_hub(source, config, text_field)


# ---- what the resume manifest records -------------------------------------------------------------

def fingerprint(files: Sequence[Path], root: Path, known: Sequence[dict] = ()) -> List[dict]:
    """[{path (relative to root), size, mtime_ns, sha256}] of the source files.

    The whole content is hashed (about 1 minute for FineWeb-Edu's 10B tokens of parquet, before hours of
    tokenizing), so an edit that keeps the size is seen too. A file whose size and mtime_ns are those
    recorded in `known` keeps its recorded hash: a resume reads nothing, and a copied folder (new mtimes)
    is hashed again and found the same."""
    recorded = {(k["path"], k["size"], k["mtime_ns"]): k["sha256"] for k in known}
    root = root if root.is_dir() else root.parent
    prints = []
    for path in files:
        stat = path.stat()
        name = path.relative_to(root).as_posix()
        digest = recorded.get((name, stat.st_size, stat.st_mtime_ns))
        if digest is None:
            if stat.st_size >= 10**8:  # seconds or more: say why nothing else is happening yet
                log.info(f"hashing {name} ({stat.st_size / 1e9:.1f} GB) for the resume manifest")
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        prints.append({"path": name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest})
    return prints


def changes(before: Sequence[dict], now: Sequence[dict]) -> Optional[str]:
    """How the source files differ ("b.jsonl is new; a.jsonl changed"), or None when their contents are the same."""
    old = {f["path"]: (f["size"], f["sha256"]) for f in before}
    new = {f["path"]: (f["size"], f["sha256"]) for f in now}
    said = ([f"{p} is new" for p in new if p not in old] + [f"{p} is gone" for p in old if p not in new] +
            [f"{p} changed" for p in new if p in old and new[p] != old[p]])
    if not said:
        return None
    return "; ".join(said[:3]) + (f"; and {len(said) - 3} more" if len(said) > 3 else "")


def local_root(source: str) -> Optional[Path]:
    """The resolved local file or folder `source` names, or None for a hub data set."""
    path = Path(source).expanduser()
    return path.resolve() if path.exists() else None

