"""The GPT-2 tokenizer: exact ids on Tiny Shakespeare, round trips, and a clear error offline."""

import pytest
import tiktoken

from gpt2 import tokenizer
from gpt2.errors import UsageError


def test_first_100_characters_of_tiny_shakespeare(shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")[:100]
    ids = tokenizer.encode(text)
    assert len(ids) == 31
    assert ids[:2] == [5962, 22307]
    assert ids[-1] == 1639


@pytest.mark.parametrize("text", ["", "First Citizen:\nBefore we proceed", "  héllo — wörld 🙂\n\n\t", "<|endoftext|>"])
def test_round_trip(text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_token_text_is_plain_text():
    # user text that spells <|endoftext|> must not become the special token (nor raise)
    assert tokenizer.EOT not in tokenizer.encode("a <|endoftext|> b")
    assert tokenizer.decode([tokenizer.EOT]) == "<|endoftext|>"


def test_get_tokenizer_is_gpt2_and_cached():
    enc = tokenizer.get_tokenizer()
    assert enc is tokenizer.get_tokenizer()
    assert enc.n_vocab == 50257
    assert enc.eot_token == tokenizer.EOT == 50256


def test_decode_accepts_tensors():
    torch = pytest.importorskip("torch")
    ids = tokenizer.encode("Hello world")
    assert tokenizer.decode(torch.tensor(ids)) == "Hello world"


def test_offline_without_cache_is_a_usage_error(monkeypatch):
    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    tokenizer.get_tokenizer.cache_clear()
    try:
        with pytest.raises(UsageError) as info:
            tokenizer.get_tokenizer()
    finally:
        tokenizer.get_tokenizer.cache_clear()  # the next test loads the real one again
    message = str(info.value)
    assert "TIKTOKEN_CACHE_DIR" in message and "\n" not in message
