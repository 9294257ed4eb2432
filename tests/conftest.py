"""Shared test set-up: no network, tokenizer and Tiny Shakespeare from local copies where they exist."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # CI and the development machines keep offline copies here

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub miss otherwise retries for ~24 s
os.environ.setdefault("WANDB_MODE", "disabled")
if (SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))


def _find_shakespeare():
    given = os.environ.get("GPT2_SPEEDRUN_TEST_DATA")  # `python -m gpt2.bench --data FILE` passes its file here
    for candidate in ([Path(given)] if given else []) + [SHARED / "data" / "tinyshakespeare.txt",
                      Path(os.environ.get("GPT2_SPEEDRUN_CACHE", Path.home() / ".cache" / "gpt2-speedrun"))
                      / "tinyshakespeare.txt"]:
        if candidate.is_file():
            return candidate
    return None


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """The real Tiny Shakespeare text; tests that check its exact tokens need it."""
    path = _find_shakespeare()
    if path is None:
        pytest.skip("Tiny Shakespeare is not on this machine: run `python run.py` once to download it "
                    "(CI uses ../shared/data/tinyshakespeare.txt)")
    return path
