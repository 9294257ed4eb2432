"""OpenAI's completions responses, from a finished or streaming generation (gpt2/serve_worker.py).

    plain:    {"id", "object": "text_completion", "created", "model", "choices": [...], "usage": {...}}
    streamed: one `data: {...}` event per piece of text (same shape, no usage), then `data: [DONE]`
"""

import json

from .serve_request import Completion, error_body


class Reply:
    """The parts every response of one request shares."""

    def __init__(self, cid: str, created: int, model: str, request: Completion, decode):
        self.cid, self.created, self.model, self.request, self.decode = cid, created, model, request, decode
        self.echo = [decode(p) if request.echo else "" for p in request.rows]

    def head(self) -> dict:
        return {"id": self.cid, "object": "text_completion", "created": self.created, "model": self.model}

    def body(self, results: list) -> dict:
        """The plain response: one choice per row, and the tokens used."""
        choices = [{"text": self.echo[i] + r.text, "index": i, "logprobs": None, "finish_reason": r.finish_reason}
                   for i, r in enumerate(results)]
        prompt_tokens = sum(len(p) for p in self.request.prompts)
        completion_tokens = sum(len(r.tokens) for r in results)
        return {**self.head(), "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def event(self, i: int, text: str, reason) -> str:
        choice = {"text": text, "index": i, "logprobs": None, "finish_reason": reason}
        return "data: " + json.dumps({**self.head(), "choices": [choice]}) + "\n\n"

    async def events(self, generation):
        """The server-sent events of a streamed response; the generation is cancelled when this ends early
        (the client went away and the response was cancelled or closed)."""
        try:
            for i, text in enumerate(self.echo):
                if text:
                    yield self.event(i, text, None)
            async for item in generation.pieces():
                yield self.event(*item)
            if generation.error is not None:
                yield "data: " + json.dumps(error_body(generation.failure(), kind="server_error")) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            generation.cancel()
