"""The boundary of `python -m gpt2.serve`: an OpenAI completions request read, parsed and checked in full
before any generation starts, each refusal a RequestError that names the field and the limit.

The body is read up to a byte limit (413), parsed as strict JSON (no NaN or Infinity, too deep a nesting is
an error, not a crash), then every field is checked: types (a boolean is not a number), ranges (64-bit
seeds, token ids of the served model's vocabulary, logprobs 0..5), and the caps that bound one request's
work: new tokens, characters per prompt (checked before tokenizing), tokens per prompt, completions per
request (prompts x n), stop strings and their length. Fields this server does not know are ignored, as OpenAI does.
"""

import json
import math
import secrets
from dataclasses import dataclass, field
from typing import Optional

from gpt2.model.generation import SEED_SPACE

MAX_LOGPROBS = 5  # the likeliest tokens listed per token, at most: OpenAI's limit
CHARS_PER_TOKEN = 32  # a prompt may hold this many characters per token of context (English: about 4)


class RequestError(Exception):
    """A request this server will not run: the message names the field (`param`) and what to send instead."""

    def __init__(self, message: str, param=None, status: int = 400, kind: str = "invalid_request_error",
                 code=None, headers=None):
        super().__init__(message)
        self.param, self.status, self.kind, self.code, self.headers = param, status, kind, code, headers


def error_body(message: str, param=None, kind: str = "invalid_request_error", code=None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. `context` and `vocab` come from the served model."""
    context: int  # tokens per prompt: the model's block_size
    vocab: int  # token ids a prompt may hold (generation.prompt_vocab_size)
    max_tokens: int = 1024  # new tokens per completion (--max-tokens)
    max_batch: int = 16  # completions per request, prompts x n (--max-batch): each is a row of KV cache
    max_body_bytes: int = 1 << 20  # (--max-body-bytes)
    max_stop: int = 4  # stop strings, as OpenAI
    max_stop_chars: int = 256  # characters per stop string

    @property
    def max_prompt_chars(self) -> int:
        return self.context * CHARS_PER_TOKEN


@dataclass
class Completion:
    """A checked request: every field valid, prompts as token ids."""
    prompts: list  # lists of token ids, one per prompt
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    n: int = 1
    stop: list = field(default_factory=list)
    stream: bool = False
    seed: int = 0
    echo: bool = False
    logprobs: Optional[int] = None  # how many of the likeliest tokens to list per token (0..5); None: off

    @property
    def rows(self) -> list:
        """The prompts in OpenAI's order of choices: prompt 0 sample 0..n-1, prompt 1 ..."""
        return [p for p in self.prompts for _ in range(self.n)]

    @property
    def sampling(self) -> dict:
        """The keyword arguments of generation.stream_text."""
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=None if self.top_p >= 1 else self.top_p,
                    seed=self.seed)


def too_large(limit: int) -> RequestError:
    return RequestError(f"the request body is larger than the server's limit of {limit} bytes (--max-body-bytes)",
                        status=413)


async def read_body(request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to pass `limit`: by its Content-Length before reading,
    or while reading one without (chunked)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise RequestError(f"Content-Length {length[:20]!r} is not a number of bytes")
        if len(length) > 18 or int(length) > limit:
            raise too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(limit)
    return bytes(body)


def _no_constants(name):
    raise RequestError(f"the request body holds {name}, which is not JSON: send a finite number")


def parse_json(raw: bytes):
    try:
        return json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        raise RequestError("the request body nests arrays or objects too deeply to read (about 1000 levels)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise RequestError(f"the request body is not valid JSON ({reason})") from None


def _show(value) -> str:
    """A value for a message: short, and never a walk through a deep container."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(body, name, default, lo, hi, *, integer=False, lo_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            integer and isinstance(value, float) and not value.is_integer()):
        kind = "an integer" if integer else "a number"
        raise RequestError(f"'{name}' must be {kind}, not {_show(value)}", name)
    if (isinstance(value, float) and not math.isfinite(value)) or value < lo or value > hi or (lo_open and value == lo):
        raise RequestError(f"'{name}' is {_show(value)}; it must be {'>' if lo_open else '>='} {lo} and <= {hi}",
                           name)
    return int(value) if integer else float(value)


def _flag(body, name) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false, not {_show(value)}", name)
    return bool(value)


def _prompt_list(body, limits: Limits) -> list:
    """The prompts as strings or lists of ids, their number and characters checked (nothing tokenized yet)."""
    prompt = body.get("prompt")
    if prompt is None:
        raise RequestError("'prompt' is required: a string or a list of strings", "prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(p, str) or (isinstance(p, list) and all(_is_id(t) for t in p)) for p in prompt):
        raise RequestError("'prompt' must be a string, a list of strings, or token ids", "prompt")
    if len(prompt) > limits.max_batch:
        raise RequestError(f"'prompt' holds {len(prompt)} prompts; at most {limits.max_batch} per request "
                           "(the server's --max-batch)", "prompt")
    for p in prompt:
        if isinstance(p, str) and len(p) > limits.max_prompt_chars:
            raise RequestError(f"'prompt' is {len(p)} characters; at most {limits.max_prompt_chars} "
                               f"({CHARS_PER_TOKEN} per token of the model's context of {limits.context})", "prompt")
    return prompt


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tokenized(prompts: list, limits: Limits, encode) -> list:
    ids = [encode(p) if isinstance(p, str) else list(p) for p in prompts]
    for p, given in zip(ids, prompts):
        if not p:
            raise RequestError("'prompt' is empty: give at least one character", "prompt")
        if len(p) > limits.context:
            raise RequestError(f"'prompt' is {len(p)} tokens, longer than the model's context of {limits.context}",
                               "prompt")
        bad = next((t for t in p if not 0 <= t < limits.vocab), None)
        if bad is not None:
            what = "encodes to" if isinstance(given, str) else "holds"
            raise RequestError(f"'prompt' {what} token id {_show(bad)}, outside this model's vocabulary "
                               f"(0..{limits.vocab - 1})", "prompt")
    return ids


def _stop(body, limits: Limits) -> list:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > limits.max_stop or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"'stop' must be a non-empty string or a list of up to {limits.max_stop} of them", "stop")
    if any(len(s) > limits.max_stop_chars for s in stop):
        raise RequestError(f"'stop' holds a string of {max(map(len, stop))} characters; at most "
                           f"{limits.max_stop_chars} each", "stop")
    return stop


def _seed(body) -> int:
    seed = body.get("seed")
    if seed is None:
        return secrets.randbelow(2**31)
    if not _is_id(seed):
        raise RequestError(f"'seed' must be an integer, not {_show(seed)}", "seed")
    if not -SEED_SPACE // 2 <= seed < SEED_SPACE:
        raise RequestError(f"'seed' is {_show(seed)}; it must be a 64-bit integer "
                           f"({-SEED_SPACE // 2} .. {SEED_SPACE - 1})", "seed")
    return seed


def parse_completion(raw: bytes, limits: Limits, encode) -> Completion:
    """The checked request of a raw body; RequestError naming the field otherwise. Tokenizes the prompts, so
    the server calls it off the event loop."""
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    prompts, echo = _prompt_list(body, limits), _flag(body, "echo")
    request = Completion(
        prompts=[], stop=_stop(body, limits), stream=_flag(body, "stream"), echo=echo, seed=_seed(body),
        # 0 new tokens only with echo: the prompt scored (logprobs), as lm-evaluation-harness asks
        max_tokens=_number(body, "max_tokens", 16, 0 if echo else 1, limits.max_tokens, integer=True),
        logprobs=_number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True),
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=_number(body, "top_p", 1.0, 0, 1, lo_open=True),
        top_k=_number(body, "top_k", None, 1, 1 << 30, integer=True),  # not OpenAI's; as vLLM takes it
        n=_number(body, "n", 1, 1, limits.max_batch, integer=True))
    if len(prompts) * request.n > limits.max_batch:
        raise RequestError(f"{len(prompts)} prompts x n={request.n} is {len(prompts) * request.n} completions; at "
                           f"most {limits.max_batch} per request (the server's --max-batch)", "n")
    request.prompts = _tokenized(prompts, limits, encode)
    return request
