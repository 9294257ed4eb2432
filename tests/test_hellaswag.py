"""HellaSwag: build-nanogpt's scoring against an independent transformers computation, the command, the
download with its checksum, and one-line errors."""

import http.server
import json
import threading

import pytest
import tiktoken
import torch
import torch.nn.functional as F

from gpt2 import evaluate as evaluate_cmd
from gpt2.evaluation import hellaswag
from gpt2.training.checkpoint import save_checkpoint
from gpt2.errors import UsageError
from gpt2.model.gpt import GPT, GPTConfig

ROWS = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "ctx": "A woman is outside with a bucket and a dog. The dog is running around trying to avoid a "
                       "bath. she", "label": 2,
     "endings": ["rinses the bucket off with soap and blow dry the dog's head.",
                 "uses a hose to keep it from getting soapy.", "gets the dog wet, then it runs away again.",
                 "gets into a bath tub with the dog."]},
    {"ind": 106, "ctx": "Kids are playing in the park. A boy", "label": 0,
     "endings": ["kicks the ball.", "flies.", "is eating a very large sandwich made of bread, cheese and ham.",
                 "sleeps"]},
    {"ind": 7, "ctx": "How to make tea. Boil the water", "label": 1,
     "endings": ["in a kettle, then pour it over the leaves.", "and wait.", "quickly", "with salt — ünïcödé ✓"]},
    {"ind": 8, "ctx": "The chef cuts the onions. Then he", "label": 1,
     "endings": ["fries them.", "cries.", "puts them in a pan with oil and stirs them for a while.", "leaves."]},
]


@pytest.fixture
def rows_file(tmp_path):
    path = tmp_path / "hellaswag_rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A small random transformers GPT-2 (the full vocabulary), saved as a hub folder would be."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3)  # wide weights: clear winners
    folder = tmp_path_factory.mktemp("hf-gpt2")
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return folder


def reference_losses(logits_of, rows, max_len=None):
    """The independent computation: tiktoken's tokens of ctx + " " + ending, one unpadded sequence per ending
    (with max_len, its last max_len tokens: every sequence given here is cut), the loss summed and averaged over
    the ending tokens kept (all but a first kept token, which has nothing before it to predict it).
    logits_of(ids) is the model's (len(ids), vocab) logits."""
    enc = tiktoken.get_encoding("r50k_base")
    sums, means = [], []
    for row in rows:
        ctx = enc.encode_ordinary(row["ctx"])
        s, m = [], []
        for ending in row["endings"]:
            end = enc.encode_ordinary(" " + ending)
            ids = ctx + end
            if max_len is not None:
                assert len(ids) > max_len  # every sequence here is cut
                ids = ids[-max_len:]
            with torch.no_grad():
                logits = logits_of(ids)
            losses = F.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:]), reduction="none")
            scored = losses[-min(len(end), len(ids) - 1):]
            s.append(scored.sum().item())
            m.append(scored.mean().item())
        sums.append(s)
        means.append(m)
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(means, dtype=torch.float64)


def transformers_losses(folder, rows):
    """The reference on transformers' model."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    return reference_losses(lambda ids: model(torch.tensor([ids])).logits[0], rows)


def test_scoring_equals_an_independent_transformers_computation(hf_folder):
    model = GPT.from_pretrained(str(hf_folder), attention="manual")
    summed, mean = hellaswag.ending_losses(model, ROWS, "cpu")
    want_sum, want_mean = transformers_losses(hf_folder, ROWS)
    torch.testing.assert_close(summed.double(), want_sum, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-4, atol=1e-4)
    labels = torch.tensor([r["label"] for r in ROWS])
    result = hellaswag.evaluate(model, ROWS, "cpu", batch_examples=2)
    assert result["n"] == len(ROWS)
    assert result["correct"] == (want_sum.argmin(1) == labels).sum().item()
    assert result["correct_norm"] == (want_mean.argmin(1) == labels).sum().item()
    assert result["acc_norm"] == result["correct_norm"] / len(ROWS)
    assert (want_sum.argmin(1) != want_mean.argmin(1)).any()  # the two scores differ on these rows


def test_batching_and_ranks_do_not_change_the_counts(hf_folder):
    model = GPT.from_pretrained(str(hf_folder))
    one = hellaswag.evaluate(model, ROWS, "cpu", batch_examples=1)
    assert hellaswag.evaluate(model, ROWS, "cpu", batch_examples=5) == one
    halves = [hellaswag.evaluate(model, ROWS, "cpu", rank=r, world_size=2) for r in (0, 1)]
    assert sum(h["n"] for h in halves) == one["n"]
    assert sum(h["correct_norm"] for h in halves) == one["correct_norm"]
    assert model.training  # left in the mode it came in


def truncated_reference(model, rows, max_len):
    """The reference for rows longer than the context, on our model."""
    return reference_losses(lambda ids: model(torch.tensor([ids]))[0][0], rows, max_len)


def test_rows_longer_than_the_context_keep_their_ending():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    long_row = dict(ROWS[1], ctx=ROWS[1]["ctx"] * 5)
    summed, mean = hellaswag.ending_losses(model, [long_row], "cpu")
    assert torch.isfinite(summed).all() and (summed > 0).all()
    # against the truncated rows scored by hand; one ending alone longer than the context, next to short ones
    longest = dict(ROWS[2], ctx=ROWS[2]["ctx"] * 4, endings=ROWS[2]["endings"][:3] + ["and then " * 12])
    rows = [long_row, longest]
    summed, mean = hellaswag.ending_losses(model, rows, "cpu")
    want_sum, want_mean = truncated_reference(model, rows, 16)
    torch.testing.assert_close(summed.double(), want_sum, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-4, atol=1e-4)


BAD_ROWS = {  # the second line of the file; what today's message must say about it
    "endings-a-string": (json.dumps(dict(ROWS[0], endings="abcd")), 'endings is "abcd", not a list of 4 strings'),
    "endings-not-strings": (json.dumps(dict(ROWS[0], endings=[1, 2, 3, 4])),
                            "endings is [1, 2, 3, 4], not a list of 4 strings"),
    "three-endings": (json.dumps(dict(ROWS[0], endings=["a", "b", "c"])), "not a list of 4 strings"),
    "no-endings": (json.dumps({"ctx": "x", "label": 0}), "(no endings)"),
    "label-4": (json.dumps(dict(ROWS[0], label=4)), "label is 4, not an integer 0-3"),
    "label-float": (json.dumps(dict(ROWS[0], label=2.7)), "label is 2.7, not an integer 0-3"),
    "label-bool": (json.dumps(dict(ROWS[0], label=True)), "label is true, not an integer 0-3"),
    "label-word": (json.dumps(dict(ROWS[0], label="two")), 'label is "two", not an integer 0-3'),
    "no-ctx": (json.dumps({k: v for k, v in ROWS[0].items() if k != "ctx"}), "(no ctx string)"),
    "ctx-number": (json.dumps(dict(ROWS[0], ctx=5)), "ctx is 5, not a string"),
    "not-utf8": (b'{"ctx": "caf\xe9", "label": 0, "endings": ["a", "b", "c", "d"]}', "not UTF-8: bad byte 13 of"),
    "not-json": ('{"ctx": "cut here', "(not JSON)"),
    "an-array": ("[1, 2]", "([1, 2] is not a JSON object)"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_malformed_row_is_one_line_naming_the_file_and_line(tmp_path, capsys, case):
    line, message = BAD_ROWS[case]
    data = tmp_path / "rows.jsonl"
    data.write_bytes(json.dumps(ROWS[1]).encode() + b"\n" + (line if isinstance(line, bytes) else line.encode())
                     + b"\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")  # never reached: the rows are checked first
    assert evaluate_cmd.main(["hellaswag", "--init", str(run), "--data", str(data), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {data}, line 2: not a HellaSwag row"), err
    assert message in err[0], err


def test_a_string_label_as_hugging_face_stores_it_is_read_as_an_integer(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(dict(ROWS[0], label="3")) + "\n")
    assert hellaswag.load_examples(data)[0]["label"] == 3


def test_the_rows_a_run_evaluates_are_read_again_when_the_file_changes(tmp_path):
    from omegaconf import OmegaConf

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    train_cfg = OmegaConf.create({"hellaswag_data": str(data), "hellaswag_limit": None})
    assert [r["ind"] for r in hellaswag.examples_for_training(train_cfg)] == [24, 92]
    # a sweep runs its jobs in one process: the next job must see the file as it is now
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[2:4]))
    assert [r["ind"] for r in hellaswag.examples_for_training(train_cfg)] == [106, 7]


def test_the_command_on_a_run_folder_writes_json(tmp_path, rows_file, capsys):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=50304))
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoint.pt", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                    step=3, data_state={}, config_yaml="{}",
                    model_shape={k: getattr(model.config, k) for k in
                                 ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")})
    out = tmp_path / "result" / "hs.json"
    rc = evaluate_cmd.main(["hellaswag", "--init", str(run), "--data", str(rows_file), "--limit", "4",
                            "--out", str(out), "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["n"] == 4 and 0 <= result["acc"] <= 1 and 0 <= result["acc_norm"] <= 1
    assert f"acc_norm {result['acc_norm']:.4f}" in printed
    model.eval()
    assert result["correct_norm"] == hellaswag.evaluate(model, ROWS[:4], "cpu")["correct_norm"]


def test_the_command_on_a_transformers_folder(hf_folder, rows_file, tmp_path):
    out = tmp_path / "hs.json"
    assert evaluate_cmd.main(["hellaswag", "--init", str(hf_folder), "--data", str(rows_file), "--out", str(out),
                              "--device", "cpu"]) == 0
    _, want_mean = transformers_losses(hf_folder, ROWS)
    labels = torch.tensor([r["label"] for r in ROWS])
    assert json.loads(out.read_text())["correct_norm"] == (want_mean.argmin(1) == labels).sum().item()


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on: connection refused, at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(hellaswag, "URL", f"http://127.0.0.1:{port}/hellaswag_val.jsonl")
    monkeypatch.setenv("GPT2_SPEEDRUN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


@pytest.mark.parametrize("argv, message", [
    (["--init", "RUN"], "could not download HellaSwag from http://127.0.0.1"),
    (["--init", "RUN", "--data", "nowhere.jsonl"], "--data nowhere.jsonl: no such file"),
    (["--init", "nowhere/at/all", "--data", "ROWS"], "--init nowhere/at/all: not a checkpoint"),
    (["--init", "RUN", "--data", "BAD"], "line 1: not a HellaSwag row"),
])
def test_offline_and_bad_input_are_one_line_errors(tmp_path, rows_file, capsys, no_network, argv, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")  # never reached: the data is checked first
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "no endings"}\n')
    argv = [{"RUN": str(run), "ROWS": str(rows_file), "BAD": str(bad)}.get(a, a) for a in argv]
    assert evaluate_cmd.main(["hellaswag", *argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    if "download" in message:
        assert "pass --data FILE" in err[0]


def test_download_is_checked_and_cached(tmp_path, rows_file, monkeypatch, no_network):
    body = rows_file.read_bytes()
    served = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            served.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        monkeypatch.setattr(hellaswag, "URL", f"http://127.0.0.1:{httpd.server_address[1]}/hellaswag_val.jsonl")
        cached = tmp_path / "cache" / "hellaswag" / "hellaswag_val.jsonl"
        with pytest.raises(UsageError, match="checksum mismatch"):  # the real file's id: our rows do not match
            hellaswag.data_file()
        assert not cached.exists()
        monkeypatch.setattr(hellaswag, "GIT_BLOB_SHA1", hellaswag.git_blob_sha1(body))
        assert hellaswag.data_file() == cached and cached.read_bytes() == body
        assert hellaswag.data_file() == cached and len(served) == 2  # the second call reads the cache
        assert len(hellaswag.load_examples(cached, limit=3)) == 3
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_git_blob_id_matches_git():
    assert hellaswag.git_blob_sha1(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's empty blob
