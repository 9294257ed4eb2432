"""Sanity checks from "Let's reproduce GPT-2 (124M)": the loss of a fresh model, and reproducible samples."""

import math
import os
import subprocess
import sys

import pytest
import torch

from gpt2.model.gpt import GPT, GPTConfig
from gpt2.tokenizer import encode
from helpers import REPO

pytestmark = pytest.mark.slow  # every test builds GPT-2 124M or starts `python -m gpt2.sample`


def test_fresh_124m_model_loss_is_near_uniform(shakespeare_path):
    # before training every one of the 50257 tokens is about equally likely: loss ~ ln(50257) = 10.82
    tokens = torch.tensor(encode(shakespeare_path.read_text()[:2000])[: 4 * 32 + 1])
    x, y = tokens[:-1].view(4, 32), tokens[1:].view(4, 32)
    torch.manual_seed(1337)
    model = GPT(GPTConfig.from_preset("gpt2")).eval()
    with torch.no_grad():
        logits, loss = model(x, y)
    assert logits.shape == (4, 32, 50257)
    assert abs(loss.item() - math.log(50257)) < 0.15, loss.item()


def sample_cli(*args):
    result = subprocess.run([sys.executable, "-m", "gpt2.sample", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line.startswith(">> ")]


def test_sample_command_is_reproducible(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)).save_pretrained(tmp_path / "hf")
    args = ["--init", str(tmp_path / "hf"), "--num-samples", "3", "--max-new-tokens", "6"]
    first, again, other = sample_cli(*args), sample_cli(*args), sample_cli(*args, "--seed", "7")
    assert len(first) == 3 and all(s.startswith(">> Hello, I'm a language model,") for s in first)
    assert first == again
    assert first != other
    assert all(len(s) > len(">> Hello, I'm a language model,") for s in first)


def test_sample_command_rejects_what_it_cannot_load(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gpt2.sample", "--init", str(tmp_path / "nothing")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --init") and "Traceback" not in result.stderr


def test_sample_command_reads_a_run_folder(tmp_path, shakespeare_path):
    from test_train import run_train

    _, run_dir = run_train(tmp_path, shakespeare_path, "+stage=flash", "train.steps=1", "train.batch_size=2",
                           "train.checkpoint_every=1")
    samples = sample_cli("--init", str(run_dir), "--num-samples", "2", "--max-new-tokens", "4", "--prompt", "ROMEO:")
    assert len(samples) == 2 and all(s.startswith(">> ROMEO:") for s in samples)


def test_gpt2_means_the_hub_even_beside_our_package_folder():
    # from the repository root "gpt2" is also our package's folder; offline, the hub cannot answer
    result = subprocess.run([sys.executable, "-m", "gpt2.sample", "--init", "gpt2"], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "huggingface" in result.stderr.lower() or "cached" in result.stderr.lower(), result.stderr
    assert "directory gpt2" not in result.stderr
