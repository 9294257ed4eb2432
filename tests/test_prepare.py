"""python -m gpt2.prepare: local documents -> build-nanogpt's uint16 .npy shards, exact sizes, resumable."""

import gzip
import json
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
