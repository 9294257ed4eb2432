"""The data pipeline: download and its failures, local files, the token cache, the split and the loader."""

import hashlib
import http.server
import logging
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from gpt2 import tokenizer
from gpt2.data import batches as data
from gpt2.config import DataConfig
from gpt2.errors import UsageError
from helpers import REPO

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20


def make_cfg(cache_dir, **overrides):
    return OmegaConf.structured(DataConfig(cache_dir=str(cache_dir), **overrides))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def cache_files(cache_dir: Path):
    return sorted(cache_dir.glob("tokens-*.bin"))


@pytest.fixture
def server(monkeypatch):
    """A small HTTP server on 127.0.0.1: put bytes in `files[path]` and fetch them from `base + path`."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")  # a proxy from the environment must not intercept
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    files = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep pytest's output clean
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield files, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/input.txt"  # nothing listens there any more: connection refused


# -----------------------------------------------------------------------------
# download


def test_download_then_tokens(server, tmp_path):
    files, base = server
    body = TEXT.encode()
    files["/shakespeare/input.txt"] = body
    cache = tmp_path / "cache"
    cfg = make_cfg(cache, url=base + "/shakespeare/input.txt", sha256=hashlib.sha256(body).hexdigest())
    tokens = data.load_tokens(cfg)
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == tokenizer.encode(TEXT)
    assert (cache / "input.txt").read_bytes() == body  # another url: its own basename
    assert not list(cache.glob(".*"))  # no temporary file left over

    del files["/shakespeare/input.txt"]  # the second run needs no network
    assert np.array_equal(data.load_tokens(cfg), tokens)


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    files, base = server
    files["/input.txt"] = TEXT.encode()
    cache = tmp_path / "cache"
    cfg = make_cfg(cache, url=base + "/input.txt", sha256="0" * 64)
    with pytest.raises(UsageError, match="checksum mismatch"):
        data.load_tokens(cfg)
    assert not cache.exists() or not any(cache.iterdir())


def test_unreachable_server_names_data_path(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(UsageError, match="data.path") as info:
        data.load_tokens(make_cfg(cache, url=closed_port_url()))
    assert "\n" not in str(info.value)
    assert not cache.exists() or not any(cache.iterdir())


def test_http_error_names_data_path(server, tmp_path):
    _, base = server
    with pytest.raises(UsageError, match="data.path"):
        data.load_tokens(make_cfg(tmp_path, url=base + "/missing.txt"))


def test_corrupt_cached_text_is_downloaded_again(server, tmp_path, caplog):
    files, base = server
    body = TEXT.encode()
    files["/input.txt"] = body
    write(tmp_path / "input.txt", "not the text the checksum names")
    cfg = make_cfg(tmp_path, url=base + "/input.txt", sha256=hashlib.sha256(body).hexdigest())
    with caplog.at_level(logging.WARNING, logger="gpt2.data.batches"):
        assert data.load_tokens(cfg).tolist() == tokenizer.encode(TEXT)
    assert (tmp_path / "input.txt").read_bytes() == body
    assert "downloading it again" in caplog.text


def test_corrupt_cached_text_offline_is_a_usage_error(tmp_path):
    write(tmp_path / "input.txt", "not the text the checksum names")
    cfg = make_cfg(tmp_path, url=closed_port_url(), sha256="1" * 64)
    with pytest.raises(UsageError, match="data.path"):
        data.load_tokens(cfg)


def test_default_url_is_cached_as_tinyshakespeare_txt(shakespeare_path, tmp_path):
    # a cached copy under the default name is used without touching the network
    (tmp_path / "tinyshakespeare.txt").write_bytes(shakespeare_path.read_bytes())
    tokens = data.load_tokens(make_cfg(tmp_path))
    assert len(tokens) == 338_025


# -----------------------------------------------------------------------------
# data.path


def test_data_path_missing(tmp_path):
    with pytest.raises(UsageError, match="data.path"):
        data.load_tokens(make_cfg(tmp_path, path=str(tmp_path / "nope.txt")))


def test_data_path_empty(tmp_path):
    with pytest.raises(UsageError, match="data.path.*empty"):
        data.load_tokens(make_cfg(tmp_path, path=str(write(tmp_path / "empty.txt", ""))))


@pytest.mark.parametrize("payload", [b"\xff\xfe\x00\x01\x80\x81", b"\x00\x01\x02\x03binary"])
def test_data_path_binary(tmp_path, payload):
    path = tmp_path / "blob.bin"
    path.write_bytes(payload)
    with pytest.raises(UsageError, match="data.path"):
        data.load_tokens(make_cfg(tmp_path, path=str(path)))


def test_data_path_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path / "mine.txt", TEXT)
    tokens = data.load_tokens(make_cfg("~/cache", path="~/mine.txt"))
    assert tokens.tolist() == tokenizer.encode(TEXT)
    assert len(cache_files(tmp_path / "cache")) == 1


def test_tiny_shakespeare_token_count(shakespeare_path, tmp_path):
    assert shakespeare_path.stat().st_size == 1_115_394
    tokens = data.load_tokens(make_cfg(tmp_path, path=str(shakespeare_path)))
    assert tokens.dtype == np.uint16 and len(tokens) == 338_025
    assert tokens[:2].tolist() == [5962, 22307]


# -----------------------------------------------------------------------------
# the token cache


def forbid_tokenizing(monkeypatch):
    def fail(text):
        raise AssertionError("tokenized again although the cache is valid")

    monkeypatch.setattr(tokenizer, "encode", fail)


def test_second_load_does_not_retokenize(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, path=str(write(tmp_path / "text.txt", TEXT)))
    first = data.load_tokens(cfg)
    forbid_tokenizing(monkeypatch)
    assert np.array_equal(data.load_tokens(cfg), first)


def test_changed_source_retokenizes(tmp_path):
    source = write(tmp_path / "text.txt", TEXT)
    cfg = make_cfg(tmp_path, path=str(source))
    data.load_tokens(cfg)
    write(source, TEXT + "Second Citizen:\nOne word, good citizens.\n")
    assert data.load_tokens(cfg).tolist() == tokenizer.encode(source.read_text())
    assert len(cache_files(tmp_path)) == 2  # one per exact source text


def test_a_file_edited_at_the_same_size_and_mtime_is_tokenized_again(tmp_path):
    source = write(tmp_path / "text.txt", TEXT)
    cfg = make_cfg(tmp_path / "cache", path=str(source))
    old = data.load_tokens(cfg)
    stat = source.stat()
    edited = TEXT.replace("Citizen", "Senator")  # same length: a stat-keyed cache could not tell
    assert len(edited.encode()) == stat.st_size
    write(source, edited)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime
    new = data.load_tokens(cfg)
    assert new.tolist() == tokenizer.encode(edited) and not np.array_equal(new, old)
    assert len(cache_files(tmp_path / "cache")) == 2  # the old text's tokens stay valid under their own key


def test_another_url_with_the_same_file_name_is_not_served_the_first_ones_copy(server, tmp_path):
    files, base = server
    files["/v1/input.txt"] = TEXT.encode()
    files["/v2/input.txt"] = (TEXT + "Second Citizen:\nOne word.\n").encode()
    cache = tmp_path / "cache"
    # no data.sha256: no checksum to tell the two apart
    first = data.load_tokens(make_cfg(cache, url=base + "/v1/input.txt", sha256=None))
    second = data.load_tokens(make_cfg(cache, url=base + "/v2/input.txt", sha256=None))
    assert first.tolist() == tokenizer.encode(TEXT)
    assert second.tolist() == tokenizer.encode(files["/v2/input.txt"].decode())
    files.clear()  # both are cached now, each under its own name: no network needed
    assert np.array_equal(data.load_tokens(make_cfg(cache, url=base + "/v1/input.txt", sha256=None)), first)
    assert sorted(p.name.split("-")[0] for p in cache.glob("input*.txt")) == ["input", "input"]


def test_cache_file_format(tmp_path):
    cfg = make_cfg(tmp_path, path=str(write(tmp_path / "text.txt", TEXT)))
    tokens = data.load_tokens(cfg)
    (path,) = cache_files(tmp_path)
    raw = path.read_bytes()
    magic, count, checksum = data.CACHE_HEADER.unpack(raw[:data.CACHE_HEADER.size])
    payload = raw[data.CACHE_HEADER.size:]
    assert magic == data.CACHE_MAGIC and count == len(tokens)
    assert checksum == hashlib.sha256(payload).digest()
    assert np.array_equal(np.frombuffer(payload, dtype="<u2"), tokens)
    assert hashlib.sha256(TEXT.encode()).hexdigest() in path.name


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "flip_header", "empty"])
def test_damaged_cache_is_rebuilt(tmp_path, caplog, damage):
    cfg = make_cfg(tmp_path, path=str(write(tmp_path / "text.txt", TEXT)))
    tokens = data.load_tokens(cfg)
    (path,) = cache_files(tmp_path)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[:-7]
    elif damage == "flip_payload":
        raw[len(raw) // 2] ^= 0xFF
    elif damage == "flip_header":
        raw[3] ^= 0x01
    else:
        raw = b""
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="gpt2.data.batches"):
        assert np.array_equal(data.load_tokens(cfg), tokens)
    assert "unusable" in caplog.text
    assert path.read_bytes() != bytes(raw)  # rebuilt on disk
    caplog.clear()
    data.load_tokens(cfg)
    assert "unusable" not in caplog.text


def test_max_chars_keeps_the_prefix(tmp_path):
    cfg = make_cfg(tmp_path, path=str(write(tmp_path / "text.txt", TEXT)), max_chars=100)
    assert data.load_tokens(cfg).tolist() == tokenizer.encode(TEXT[:100])
    with pytest.raises(UsageError, match="data.max_chars"):
        data.load_tokens(make_cfg(tmp_path, path=str(tmp_path / "text.txt"), max_chars=0))


def test_super_tiny_shakespeare(shakespeare_path, tmp_path):
    cfg = OmegaConf.merge(make_cfg(tmp_path, path=str(shakespeare_path)),
                          OmegaConf.load(REPO / "conf" / "data" / "super_tiny_shakespeare.yaml"))
    assert cfg.name == "super_tiny_shakespeare"
    text = shakespeare_path.read_text(encoding="utf-8")[:100_000]
    assert data.load_tokens(cfg).tolist() == tokenizer.encode(text)


def test_data_yaml_files_fit_the_schema():
    for name in ("tiny_shakespeare", "super_tiny_shakespeare"):
        cfg = OmegaConf.merge(make_cfg("/tmp"), OmegaConf.load(REPO / "conf" / "data" / f"{name}.yaml"))
        assert cfg.name == name


# -----------------------------------------------------------------------------
# split and loader


def test_train_val_split():
    tokens = np.arange(1000, dtype=np.uint16)
    train, val = data.train_val_split(tokens, 0.1)
    assert len(train) == 900 and len(val) == 100
    assert np.array_equal(np.concatenate([train, val]), tokens)
    train, val = data.train_val_split(tokens, 0.0)
    assert len(train) == 1000 and len(val) == 0
    with pytest.raises(UsageError, match="data.val_fraction"):
        data.train_val_split(tokens, 1.0)


def ramp(n):
    return (np.arange(n) % 50257).astype(np.uint16)


def test_loader_shapes_and_shift():
    loader = data.TokenLoader(ramp(100), batch_size=2, seq_len=8)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (2, 8)
    assert x.dtype == y.dtype == torch.int64 and x.device.type == "cpu"
    assert x.flatten().tolist() == list(range(16))
    assert torch.equal(x.flatten()[1:], y.flatten()[:-1])
    assert y.flatten()[-1].item() == 16


def test_loader_wraps_around():
    loader = data.TokenLoader(ramp(50), batch_size=2, seq_len=8)  # (50 - 1) // 16 = 3 chunks
    firsts = [loader.next_batch()[0][0, 0].item() for _ in range(7)]
    assert firsts == [0, 16, 32, 0, 16, 32, 0]


def test_two_ranks_read_what_one_process_reads_in_two_calls():
    tokens = ramp(1000)  # 999 // 32 = 31 chunks: odd, so the pairs cross the wrap-around too
    single = data.TokenLoader(tokens, batch_size=4, seq_len=8)
    ranks = [data.TokenLoader(tokens, batch_size=4, seq_len=8, rank=r, world_size=2) for r in range(2)]
    for _ in range(40):
        expected = [single.next_batch() for _ in range(2)]
        got = [loader.next_batch() for loader in ranks]
        for (ex, ey), (gx, gy) in zip(expected, got):
            assert torch.equal(ex, gx) and torch.equal(ey, gy)
        assert not torch.equal(got[0][0], got[1][0])  # disjoint chunks
        assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_state_dict_resumes_the_exact_next_batch():
    tokens = ramp(1000)
    loader = data.TokenLoader(tokens, batch_size=2, seq_len=16)
    for _ in range(5):
        loader.next_batch()
    state = loader.state_dict()
    assert set(state) == {"next_chunk"}
    expected = [loader.next_batch() for _ in range(3)]
    resumed = data.TokenLoader(tokens, batch_size=2, seq_len=16)
    resumed.load_state_dict(state)
    for (ex, ey), (rx, ry) in zip(expected, (resumed.next_batch() for _ in range(3))):
        assert torch.equal(ex, rx) and torch.equal(ey, ry)


def test_too_little_data_is_a_usage_error():
    with pytest.raises(UsageError, match="train.batch_size.*train.seq_len") as info:
        data.TokenLoader(ramp(16), batch_size=2, seq_len=8)  # needs 2 * 8 + 1 = 17 tokens
    assert "16" in str(info.value)
    data.TokenLoader(ramp(17), batch_size=2, seq_len=8)  # exactly enough


def test_the_suite_finds_its_data_or_says_exactly_how(tmp_path, monkeypatch):
    # the cache is consulted with its checksum; offline with an empty cache the fixture skips with the fix
    import shutil

    import conftest

    monkeypatch.setenv("GPT2_SPEEDRUN_CACHE", str(tmp_path))
    source = conftest._find_shakespeare()
    if source is None:
        pytest.skip("no local Tiny Shakespeare to seed the cache with")
    shutil.copy(source, tmp_path / "tinyshakespeare.txt")
    assert conftest._download_shakespeare() == tmp_path / "tinyshakespeare.txt"  # intact: no download
    (tmp_path / "tinyshakespeare.txt").write_text("not Shakespeare")
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    assert conftest._download_shakespeare() is None  # a corrupt copy is not used; offline: None, and a skip
