"""python -m gpt2.prepare: local documents -> build-nanogpt's uint16 .npy shards, exact sizes, resumable."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tiktoken

from gpt2 import prepare
from gpt2.errors import UsageError

DOCS = ([f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 7) + "Ünïcödé ✓ 日本語"
         for i in range(40)] + ["", "a literal <|endoftext|> inside a text is plain text", "x" * 3000])


def expected_stream(docs=DOCS) -> np.ndarray:
    """An independent encoding: tiktoken's GPT-2 ranks, <|endoftext|> before every document."""
    enc = tiktoken.get_encoding("r50k_base")
    ids = []
    for doc in docs:
        ids += [enc.eot_token] + enc.encode_ordinary(doc)
    return np.array(ids, dtype=np.uint16)


def write_jsonl(path: Path, docs=DOCS, **extra) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, "text": doc, **extra}) + "\n")
    return path


def shards_of(out: Path):
    return sorted(out.glob("edufineweb_*.npy"), key=lambda p: p.name.rsplit("_", 1)[1])


def prep(source, out, **kw):
    kw.setdefault("shard_tokens", 500)
    return prepare.prepare("fineweb_edu", str(source), out, progress=False, **kw)


def test_shards_equal_an_independent_encoding_cut_at_exact_sizes(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl")
    manifest = prep(src, tmp_path / "out", shard_tokens=500, workers=1)
    files = shards_of(tmp_path / "out")
    stream = expected_stream()
    n = -(-len(stream) // 500)
    assert [f.name for f in files] == ["edufineweb_val_000000.npy"] + [f"edufineweb_train_{i:06d}.npy"
                                                                       for i in range(1, n)]
    arrays = [np.load(f) for f in files]  # plain .npy files, as build-nanogpt's loader reads them
    assert all(a.dtype == np.uint16 and a.ndim == 1 for a in arrays)
    assert [len(a) for a in arrays[:-1]] == [500] * (n - 1) and 0 < len(arrays[-1]) <= 500
    np.testing.assert_array_equal(np.concatenate(arrays), stream)
    assert manifest["complete"] and len(manifest["shards"]) == n
    assert not list((tmp_path / "out").glob(".*.tmp"))  # no temporary files left


def test_parallel_workers_and_the_command_line_give_the_same_bytes(tmp_path, capsys):
    src = write_jsonl(tmp_path / "docs.jsonl")
    prep(src, tmp_path / "serial", shard_tokens=700, workers=1)
    rc = prepare.main(["fineweb_edu", "--source", str(src), "--out", str(tmp_path / "parallel"),
                       "--shard-tokens", "700", "--workers", "2"])
    assert rc == 0
    assert "shard(s)" in capsys.readouterr().out
    serial, parallel = shards_of(tmp_path / "serial"), shards_of(tmp_path / "parallel")
    assert [p.name for p in parallel] == [p.name for p in serial]
    for a, b in zip(serial, parallel):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_parquet_gzip_and_a_folder_read_like_json_lines(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "src"
    folder.mkdir()
    pq.write_table(pa.table({"text": DOCS[:20], "score": list(range(20))}), folder / "a.parquet")
    with gzip.open(folder / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for doc in DOCS[20:]:
            f.write(json.dumps({"text": doc}) + "\n")
    (folder / "notes.txt").write_text("not a source file")
    prep(folder, tmp_path / "out", shard_tokens=1000, workers=1)
    np.testing.assert_array_equal(np.concatenate([np.load(f) for f in shards_of(tmp_path / "out")]),
                                  expected_stream())


def test_rerun_continues_after_max_shards_and_after_a_lost_shard(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl")
    prep(src, tmp_path / "full", workers=1)
    full = {p.name: p.read_bytes() for p in shards_of(tmp_path / "full")}
    assert len(full) >= 4

    out = tmp_path / "resumed"
    first = prep(src, out, max_shards=2, workers=1)
    assert len(first["shards"]) == 2 and not first["complete"]
    assert [p.name for p in shards_of(out)] == ["edufineweb_val_000000.npy", "edufineweb_train_000001.npy"]
    assert first["shards"][-1]["next_offset"] > 0  # the second shard ends inside a document
    done = prep(src, out, workers=1)
    assert done["complete"]
    assert {p.name: p.read_bytes() for p in shards_of(out)} == full

    # a shard lost (or a run killed before its rename): the next run redoes it and what follows
    (out / "edufineweb_train_000002.npy").unlink()
    kept = (out / "edufineweb_train_000001.npy").stat().st_mtime_ns
    prep(src, out, workers=1)
    assert {p.name: p.read_bytes() for p in shards_of(out)} == full
    assert (out / "edufineweb_train_000001.npy").stat().st_mtime_ns == kept  # finished shards are not rewritten

    # finished: a re-run writes nothing
    stamps = {p.name: p.stat().st_mtime_ns for p in shards_of(out)}
    assert prep(src, out, workers=1)["complete"]
    assert {p.name: p.stat().st_mtime_ns for p in shards_of(out)} == stamps


def test_a_document_longer_than_several_shards(tmp_path):
    docs = ["short", "word " * 2000, "end"]
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    prep(src, tmp_path / "out", shard_tokens=300, workers=1)
    arrays = [np.load(f) for f in shards_of(tmp_path / "out")]
    assert [len(a) for a in arrays[:-1]] == [300] * (len(arrays) - 1)
    np.testing.assert_array_equal(np.concatenate(arrays), expected_stream(docs))
    out2 = tmp_path / "out2"  # resuming inside the long document
    prep(src, out2, shard_tokens=300, workers=1, max_shards=3)
    prep(src, out2, shard_tokens=300, workers=1)
    np.testing.assert_array_equal(np.concatenate([np.load(f) for f in shards_of(out2)]), expected_stream(docs))


def test_other_settings_in_the_same_folder_are_refused(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl")
    prep(src, tmp_path / "out", shard_tokens=500, workers=1, max_shards=1)
    with pytest.raises(UsageError, match="holds shards made with other settings"):
        prep(src, tmp_path / "out", shard_tokens=600, workers=1)


@pytest.mark.parametrize("case, message", [("missing", "no such file or folder"), ("empty", "holds no .parquet"),
                                           ("no-text", "line 1: no 'text' field"), ("not-json", "line 1: not JSON")])
def test_bad_sources_are_one_line_errors(tmp_path, capsys, case, message):
    source = tmp_path / case
    if case == "empty":
        source.mkdir()
    elif case != "missing":
        source = tmp_path / f"{case}.jsonl"
        source.write_text(json.dumps({"body": "hello"}) + "\n" if case == "no-text" else "{not json\n")
    rc = prepare.main(["fineweb_edu", "--source", str(source), "--out", str(tmp_path / "out"), "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and message in err[-1], err
    assert "Traceback" not in "\n".join(err)


def test_the_hub_offline_is_a_one_line_error_naming_the_fix(tmp_path, capsys, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rc = prepare.main(["fineweb_edu", "--out", str(tmp_path / "out"), "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: could not open HuggingFaceFW/fineweb-edu (sample-10BT)"), err
    assert "--source" in err[-1]
    assert not list((tmp_path / "out").glob("*.npy"))


# ---- sources that are damaged, and sources that changed under a resume -------------------------------

def bad_source(tmp_path: Path, case: str) -> Path:
    """A source file whose second document (line 2) is bad in the way `case` names."""
    good = json.dumps({"text": DOCS[0]}).encode() + b"\n"
    lines = {"latin-1": b'{"text": "caf\xe9"}\n', "array": b'["a", "list"]\n', "null-text": b'{"text": null}\n',
             "number-text": b'{"text": 7}\n', "no-text": b'{"body": "hello"}\n', "cut-json": b'{"text": "a\n'}
    if case in lines:
        path = tmp_path / f"{case}.jsonl"
        path.write_bytes(good + lines[case])
    elif case == "truncated-gz":
        path = tmp_path / "docs.jsonl.gz"
        packed = gzip.compress(good * 200)
        path.write_bytes(packed[:len(packed) // 2])
    elif case == "not-gz":
        path = tmp_path / "docs.jsonl.gz"
        path.write_bytes(good * 3)
    else:  # zstd: not a format prepare reads
        path = tmp_path / "docs.jsonl.zst"
        path.write_bytes(b"\x28\xb5\x2f\xfd" + good)
    return path


@pytest.mark.parametrize("case, message", [
    ("latin-1", "latin-1.jsonl, line 2: not UTF-8 (bad byte 14 of the line)"),
    ("array", "array.jsonl, line 2: an array, not a JSON object"),
    ("null-text", "null-text.jsonl, line 2: 'text' is null, not a string"),
    ("number-text", "number-text.jsonl, line 2: 'text' is a number, not a string"),
    ("no-text", "no-text.jsonl, line 2: no 'text' field (it has body)"),
    ("cut-json", "cut-json.jsonl, line 2: not JSON"),
    ("truncated-gz", "docs.jsonl.gz: the gzip data ends early after line"),
    ("not-gz", "docs.jsonl.gz: not gzip data, despite its name"),
    ("zstd", "docs.jsonl.zst: not a .parquet, .jsonl, .json, .jsonl.gz, .json.gz file"),
])
def test_a_damaged_source_file_is_one_line_naming_it_and_its_line(tmp_path, capsys, case, message):
    source = bad_source(tmp_path, case)
    out = tmp_path / "out"
    rc = prepare.main(["fineweb_edu", "--source", str(source), "--out", str(out), "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(f"error: --source {tmp_path}/") and message in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not out.exists() or not any(out.iterdir())  # nothing written from a source that could not be read


def test_a_null_in_a_parquet_text_column_names_its_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b", None]}), tmp_path / "docs.parquet")
    with pytest.raises(UsageError, match=r"docs.parquet, row 2: 'text' is null, not a string"):
        prep(tmp_path / "docs.parquet", tmp_path / "out", workers=1)


def folder_state(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("change, message", [
    ("gained", "(b.jsonl is new)"),
    ("lost", "(c.jsonl is gone)"),
    ("edited", "(c.jsonl changed)"),  # the same size: only its content hash differs
])
def test_a_resume_after_the_source_changed_is_refused_and_touches_nothing(tmp_path, capsys, change, message):
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", DOCS[:20])
    write_jsonl(src / "c.jsonl", DOCS[20:])
    out = tmp_path / "out"
    argv = ["fineweb_edu", "--source", str(src), "--out", str(out), "--shard-tokens", "500", "--workers", "1"]
    assert prepare.main(argv + ["--max-shards", "2"]) == 0
    before = folder_state(out)
    if change == "gained":  # sorted between a and c: every later document would move
        write_jsonl(src / "b.jsonl", DOCS[:5])
    elif change == "lost":
        (src / "c.jsonl").unlink()
    else:
        text = (src / "c.jsonl").read_text(encoding="utf-8")
        size = (src / "c.jsonl").stat().st_size
        (src / "c.jsonl").write_text(text.replace("Document 2", "Document 7"), encoding="utf-8")
        assert (src / "c.jsonl").stat().st_size == size
    capsys.readouterr()
    assert prepare.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: the source changed since the shards in --out {out} were "
                                               f"made {message}") and "--restart" in err[0], err
    assert folder_state(out) == before  # no shard, no manifest rewritten

    # --restart starts over: the shards are those of a fresh run on the source as it is now
    assert prepare.main(argv + ["--restart"]) == 0
    prep(src, tmp_path / "fresh", workers=1)
    assert [p.read_bytes() for p in shards_of(out)] == [p.read_bytes() for p in shards_of(tmp_path / "fresh")]


def test_a_resume_from_a_copied_source_with_new_mtimes_goes_on(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl")
    prep(src, tmp_path / "full", workers=1)
    out = tmp_path / "out"
    prep(src, out, workers=1, max_shards=2)
    os.utime(src, ns=(1, 1))  # as `cp` without -p leaves it: new mtime, same bytes (hashed again, found equal)
    assert prep(src, out, workers=1)["complete"]
    assert [p.read_bytes() for p in shards_of(out)] == [p.read_bytes() for p in shards_of(tmp_path / "full")]
