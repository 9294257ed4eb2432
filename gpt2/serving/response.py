"""OpenAI's completions responses, from a finished or streaming generation (gpt2/serving/worker.py).

    plain:    {"id", "object": "text_completion", "created", "model", "choices": [...], "usage": {...}}
    streamed: one `data: {...}` event per piece of text (same shape, no usage), then `data: [DONE]`

A choice's `logprobs` (when the request sets it) is OpenAI's {"tokens", "token_logprobs", "top_logprobs",
"text_offset"}, one entry per token: the echoed prompt's, then every generated one (the <|endoftext|> that
ended a completion too; the tokens of a stop string and any after it in the same token as well, while the
text stops before it). top_logprobs lists the k likeliest tokens and the chosen one, so up to k + 1; a
prompt's first token has null for both. text_offset counts characters from the start of the prompt, echoed
or not. A streamed event carries the tokens that came since the previous one.
"""

import functools
import json

from gpt2.serving.request import Completion, error_body

LOGPROB_FLOOR = -9999.0  # what an impossible token (-inf, not JSON) reports, as OpenAI does


@functools.lru_cache(maxsize=None)
def token_text(token: int) -> str:
    """A token as OpenAI's logprobs name it: its text, or "bytes:\\xe2\\x80" when it holds part of a character."""
    from gpt2.tokenizer import get_tokenizer

    raw = get_tokenizer().decode_single_token_bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _finite(logprob: float) -> float:
    return logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR  # also NaN, which compares False


def logprobs_body(entries, name=token_text) -> dict:
    """OpenAI's logprobs object of a list of TokenLogprobs (gpt2/model/logprobs.py)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(name(e.token))
        out["text_offset"].append(e.offset)
        if e.logprob is None:  # a prompt's first token
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_finite(e.logprob))
        top = {name(t): _finite(lp) for t, lp in e.top}
        top.setdefault(name(e.token), _finite(e.logprob))  # the chosen token is always listed
        out["top_logprobs"].append(top)
    return out


class Reply:
    """The parts every response of one request shares."""

    def __init__(self, cid: str, created: int, model: str, request: Completion, decode, name=token_text):
        self.cid, self.created, self.model, self.request, self.name = cid, created, model, request, name
        self.echo = [decode(p) if request.echo else "" for p in request.rows]

    def head(self) -> dict:
        return {"id": self.cid, "object": "text_completion", "created": self.created, "model": self.model}

    def logprobs(self, entries):
        return None if self.request.logprobs is None else logprobs_body(entries or [], self.name)

    def body(self, results: list) -> dict:
        """The plain response: one choice per row, and the tokens used (each prompt once, however many
        completions it has, as OpenAI counts; every generated id, a final <|endoftext|> included)."""
        choices = [{"text": self.echo[i] + r.text, "index": i, "logprobs": self.logprobs(r.logprobs),
                    "finish_reason": r.finish_reason} for i, r in enumerate(results)]
        prompt_tokens = sum(len(p) for p in self.request.prompts)
        completion_tokens = sum(r.completion_tokens for r in results)
        return {**self.head(), "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def event(self, i: int, text: str, reason, entries=None) -> str:
        choice = {"text": text, "index": i, "logprobs": self.logprobs(entries), "finish_reason": reason}
        return "data: " + json.dumps({**self.head(), "choices": [choice]}) + "\n\n"

    async def events(self, generation):
        """The server-sent events of a streamed response (an echoed prompt is the generation's first piece);
        the generation is cancelled when this ends early (the client went away: the response was cancelled
        or closed)."""
        try:
            async for item in generation.pieces():
                yield self.event(*item)
            if generation.error is not None:
                yield "data: " + json.dumps(error_body(generation.failure(), kind="server_error")) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            generation.cancel()
