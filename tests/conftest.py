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


def _download_shakespeare():
    """The project's own download (checksum, cache) into the cache folder; None when offline."""
    from gpt2.config import DataConfig
    from gpt2.data import DEFAULT_FILE_NAME, _read_downloaded
    from gpt2.errors import UsageError

    cache = Path(os.environ.get("GPT2_SPEEDRUN_CACHE", Path.home() / ".cache" / "gpt2-speedrun")).expanduser()
    try:
        _read_downloaded(DataConfig(), cache)
    except UsageError:
        return None
    return cache / DEFAULT_FILE_NAME


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """The real Tiny Shakespeare text (1.1 MB): from GPT2_SPEEDRUN_TEST_DATA, ../shared, the cache, or
    downloaded by the project's own code; the tests that train or check exact tokens need it."""
    path = _find_shakespeare() or _download_shakespeare()
    if path is None:
        pytest.skip("Tiny Shakespeare is not on this machine and could not be downloaded (offline?): fetch "
                    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt "
                    "and set GPT2_SPEEDRUN_TEST_DATA=/path/to/input.txt")
    return path
