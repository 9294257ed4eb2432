"""python -m gpt2.hf_export: a real tiny run (the nice-vocab stage: a padded table of 50304 rows) exported and
loaded back by transformers offline, with no warning, the same logits, the same greedy text and the same token
ids as tiktoken; the model card's figures; an existing folder refused; the hub upload with HfApi mocked."""

import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from gpt2 import hf_export
from gpt2.runs import hf_folder
from gpt2.model.generation import generate_ids
from gpt2.runs.loading import load_model
from gpt2.tokenizer import EOT, get_tokenizer
from helpers import data_args, run_py, tiny_with

# HellaSwag-like rows the run evaluates during training, so that its summary holds HellaSwag figures
ROWS = [{"ctx": f"Row {i}: she opens the door and", "label": i % 4,
         "endings": ["walks in.", "sits down.", "sings.", "closes it."]} for i in range(3)]
FILES = {"README.md", "config.json", "generation_config.json", "merges.txt", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json", "vocab.json"}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shakespeare_path):
    """A finished run folder: the nice-vocab stage on the tiny model, 2 steps, validated, HellaSwag evaluated."""
    tmp = tmp_path_factory.mktemp("trained")
    rows = tmp / "hellaswag.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    overrides = tiny_with("train.steps=2", "train.val_every=1", "train.hellaswag_every=2",
                          f"train.hellaswag_data={rows}")
    result = run_py("+stage=nice-vocab", *overrides, *data_args(tmp, shakespeare_path), f"hydra.run.dir={tmp / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    return hf_folder.export(trained_run, tmp_path_factory.mktemp("exported") / "gpt2-tiny")


def last_line(err: str) -> str:
    """stderr's last line, once transformers' progress bar (carriage returns) is out of the way; there must be
    no traceback."""
    assert "Traceback" not in err, err
    return err.rstrip("\n").split("\n")[-1].split("\r")[-1]


class Recorded(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


@pytest.fixture
def transformers_warnings():
    """Every warning transformers logs (its own handler does not propagate) and every Python warning."""
    handler = Recorded()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield lambda: handler.records + [str(w.message) for w in caught]
    logger.removeHandler(handler)


def test_the_folder_loads_offline_with_no_warning_and_our_logits(exported, trained_run, transformers_warnings):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert {p.name for p in exported.iterdir()} == FILES  # safetensors only: no pickle (pytorch_model.bin)
    with safe_open(exported / "model.safetensors", "pt") as f:
        assert f.get_tensor("transformer.wte.weight").shape == (50257, 64)  # padding cut: the HF vocabulary
    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    AutoTokenizer.from_pretrained(exported)
    assert transformers_warnings() == []
    config = json.loads((exported / "config.json").read_text())
    assert config["vocab_size"] == 50257 and config["n_positions"] == 64
    assert config["architectures"] == ["GPT2LMHeadModel"]
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["bos_token_id"] == generation["eos_token_id"] == generation["pad_token_id"] == EOT

    ours, _ = load_model(str(trained_run))
    assert ours.config.vocab_size == 50304  # the run's padded table
    ids = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(ids)[0][..., :50257]
        got = hf(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_the_pipelines_greedy_text_is_ours(exported, trained_run):
    from transformers import pipeline

    prompt = "ROMEO:\nWhat say you"
    generate = pipeline("text-generation", model=str(exported), device="cpu")
    got = generate(prompt, max_new_tokens=20, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    ours, _ = load_model(str(trained_run))
    ids = get_tokenizer().encode_ordinary(prompt)
    want = generate_ids(ours, torch.tensor([ids]), 20, temperature=0.0)[0].tolist()
    if EOT in want[len(ids):]:  # transformers stops at eos, ours does not
        want = want[:want.index(EOT, len(ids)) + 1]
    assert got == want
    text = generate(prompt, max_new_tokens=20, do_sample=False)[0]["generated_text"]
    assert text == get_tokenizer().decode(want)


TEXTS = ["Hello, world!", "naïve café — 日本語 🤖 ünïcödé ✓", "  two  spaces,   three\tand a tab ",
         "line one\n\nline three\r\n\n", "before<|endoftext|>after", "<|endoftext|>", "don't I'll we've 1234567"]


def test_the_tokenizer_gives_tiktokens_ids(exported, shakespeare_path):
    from transformers import AutoTokenizer

    tokenizer, tiktoken_gpt2 = AutoTokenizer.from_pretrained(exported), get_tokenizer()
    for text in TEXTS:  # <|endoftext|> is the special token 50256, as tiktoken's allowed_special makes it
        want = tiktoken_gpt2.encode(text, allowed_special="all")
        assert tokenizer(text)["input_ids"] == want, text
        assert tokenizer.decode(want) == text
    assert EOT in tokenizer("a<|endoftext|>b")["input_ids"]
    shakespeare = shakespeare_path.read_text()  # 338,025 tokens: every merge that text needs, in order
    assert tokenizer(shakespeare)["input_ids"] == tiktoken_gpt2.encode_ordinary(shakespeare)
    merges = (exported / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[:3] == ["#version: 0.2", "Ġ t", "Ġ a"] and len(merges) == 1 + 50000  # GPT-2's own file
    vocab = json.loads((exported / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == EOT and vocab["!"] == 0 and vocab["Ġthe"] == 262


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_the_card_has_the_runs_figures(exported, trained_run):
    summary = json.loads((trained_run / "summary.json").read_text())
    card = (exported / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "gpt2" in meta["tags"] and "license" not in meta  # trained from scratch: no licence known
    assert "| Stage | nice-vocab |" in card
    assert f"| Tokens seen | {summary['steps'] * summary['tokens_per_step']:,} |" in card
    assert f"| Final validation loss | {summary['val_loss']:.4f} |" in card
    assert f"acc_norm {summary['hellaswag_acc_norm']:.4f}" in card and f"on {len(ROWS)} rows" in card
    assert f"| Command | `{summary['command']}` |" in card and "| Hardware | cpu," in card
    assert "not recorded" not in card


def test_a_bare_model_file_says_its_figures_are_not_recorded(trained_run, tmp_path):
    bare = tmp_path / "weights.pt"
    shutil.copy(trained_run / "checkpoint.pt", bare)
    card = (hf_folder.export(bare, tmp_path / "out") / "README.md").read_text()
    assert "bare model file" in card and "| Final validation loss | not recorded |" in card
    assert "| Command | not recorded |" in card and front_matter(card)["pipeline_tag"] == "text-generation"


def test_an_existing_folder_is_refused_and_left_as_it_was(trained_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert hf_export.main(["--init", str(trained_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --out {out} exists and is not empty") and "--force" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left beside it

    assert hf_export.main(["--init", str(trained_run), "--out", str(out), "--force"]) == 0
    assert {p.name for p in out.iterdir()} == FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_interrupted_export_leaves_no_half_folder(trained_run, tmp_path, monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_folder, "save_tokenizer", interrupted)  # after the weights are written
    assert hf_export.main(["--init", str(trained_run), "--out", str(tmp_path / "new")]) == 130
    assert last_line(capsys.readouterr().err).startswith("interrupted:")
    old = tmp_path / "old"
    old.mkdir()
    (old / "mine.txt").write_text("keep me")
    assert hf_export.main(["--init", str(trained_run), "--out", str(old), "--force"]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"] and [p.name for p in old.iterdir()] == ["mine.txt"]


class FakeHfApi:
    """HfApi as push_to_hub calls it; what it would have uploaded is recorded, nothing leaves the machine."""
    calls = []
    fail = None

    def create_repo(self, repo_id, **kw):
        if self.fail:
            raise self.fail
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, **kw):
        files = {p.name: p.stat().st_size for p in Path(folder_path).iterdir()}
        self.calls.append(("upload_folder", repo_id, {"folder_path": folder_path, "files": files, **kw}))


def test_push_to_hub_creates_the_repo_and_uploads_the_whole_folder(trained_run, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    FakeHfApi.calls, FakeHfApi.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    out = tmp_path / "out"
    assert hf_export.main(["--init", str(trained_run), "--out", str(out), "--push-to-hub", "me/gpt2-tiny",
                           "--private"]) == 0
    (create, repo, create_kw), (upload, repo_again, upload_kw) = FakeHfApi.calls
    assert (create, repo, upload, repo_again) == ("create_repo", "me/gpt2-tiny", "upload_folder", "me/gpt2-tiny")
    assert create_kw == {"repo_type": "model", "private": True, "exist_ok": True}
    assert upload_kw["folder_path"] == str(out) and set(upload_kw["files"]) == FILES
    assert upload_kw["files"]["model.safetensors"] > 1_000_000 and upload_kw["repo_type"] == "model"
    assert 'model="me/gpt2-tiny"' in (out / "README.md").read_text()  # the card names the repository
    assert "pushed to https://huggingface.co/me/gpt2-tiny" in capsys.readouterr().out

    FakeHfApi.fail = OSError("401 Client Error: Unauthorized for url")
    assert hf_export.main(["--init", str(trained_run), "--out", str(out), "--force", "--push-to-hub", "me/x"]) == 2
    err = last_line(capsys.readouterr().err)
    assert err.startswith("error: --push-to-hub me/x: 401 Client Error") and "hf auth login" in err
    assert {p.name for p in out.iterdir()} == FILES  # the export itself is kept
