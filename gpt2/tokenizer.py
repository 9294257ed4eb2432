"""GPT-2's byte-pair tokenizer (tiktoken), loadable on a machine with no network."""

import functools

import tiktoken

from gpt2.errors import UsageError

# tiktoken.get_encoding("gpt2") fetches encoder.json and vocab.bpe from the internet and fails offline.
# "r50k_base" is the same tokenizer under another name (same ranks, same regex, <|endoftext|> = 50256),
# stored as one file that tiktoken caches in TIKTOKEN_CACHE_DIR, so a copy of that cache is enough offline.
ENCODING = "r50k_base"
CACHE_FILE = "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4"  # tiktoken names it by the sha1 of its URL
EOT = 50256  # <|endoftext|>, the last of GPT-2's 50257 tokens


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding, loaded once per process."""
    try:
        enc = tiktoken.get_encoding(ENCODING)
    except Exception as e:  # requests' ConnectionError, a hash mismatch, a read-only cache, ...
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UsageError(
            f"cannot load the GPT-2 tokenizer (tiktoken {ENCODING!r}: {reason}); connect to the internet once "
            f"so tiktoken can cache it, or set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cache file "
            f"{CACHE_FILE}") from e
    assert enc.eot_token == EOT, f"{ENCODING} has <|endoftext|> = {enc.eot_token}, expected {EOT}"
    return enc


def encode(text: str) -> list[int]:
    # encode_ordinary: a text that happens to contain "<|endoftext|>" is plain text, not a special token
    # (tiktoken's encode() would raise on it)
    return get_tokenizer().encode_ordinary(text)


def decode(ids) -> str:
    if hasattr(ids, "tolist"):  # a torch tensor or numpy array
        ids = ids.tolist()
    return get_tokenizer().decode(list(ids))
