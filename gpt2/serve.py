"""Talk to a model: a web page and an OpenAI-compatible completions API.

    python -m gpt2.serve --init outputs/2026-11-25/10-00-00_flash     # then open http://127.0.0.1:8000
    python -m gpt2.serve --init gpt2 --port 8080 --device cpu --max-tokens 512

    GET  /                 the page: prompt, sampling controls, Generate, the text as it streams in
    GET  /v1/models        the one model
    POST /v1/completions   OpenAI's completions request and response (stream: server-sent events, then [DONE])
    GET  /info             what is loaded: run folder, stage, steps, validation loss

Needs the `serve` extra: pip install -e ".[serve]". Generation runs in worker threads, off the event loop, each
request with its own KV cache and random generators; a client that goes away mid-stream stops its generation.
"""

import argparse
import asyncio
import json
import threading
import math
import secrets
import sys
import time
from pathlib import Path

import torch

from .errors import UsageError
from .generation import EOT, stream_text
from .loading import describe, load_model
from .serve_page import PAGE
from .tokenizer import encode

MAX_STOP = 4  # as OpenAI


class RequestError(Exception):
    def __init__(self, message: str, param=None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def _number(body, name, default, lo, hi, *, integer=False, lo_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        kind = "an integer" if integer else "a number"
        raise RequestError(f"'{name}' must be {kind}, not {json.dumps(value)}", name)
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
        raise RequestError(f"'{name}' is {value}; it must be {'>' if lo_open else '>='} {lo} and <= {hi}", name)
    return int(value) if integer else float(value)


def parse_request(body, *, block_size: int, max_tokens_cap: int) -> dict:
    """The generation settings of an OpenAI completions request; RequestError naming the field otherwise.
    Fields this server does not know are ignored, as OpenAI does."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if "prompt" not in body or body["prompt"] is None:
        raise RequestError("'prompt' is required: a string or a list of strings", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(p, str) or (isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                                               for t in p)) for p in prompt):
        raise RequestError("'prompt' must be a string, a list of strings, or token ids", "prompt")
    ids = [encode(p) if isinstance(p, str) else list(p) for p in prompt]
    for p in ids:
        if not p:
            raise RequestError("'prompt' is empty: give at least one character", "prompt")
        if len(p) > block_size:
            raise RequestError(f"'prompt' is {len(p)} tokens, longer than the model's context of {block_size}",
                               "prompt")
        if any(t < 0 or t >= EOT + 1 for t in p):
            raise RequestError(f"'prompt' holds token ids outside 0..{EOT}", "prompt")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise RequestError("'stream' must be true or false", "stream")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"'seed' must be an integer, not {json.dumps(seed)}", "seed")
    top_k = _number(body, "top_k", None, 1, 1 << 30, integer=True)  # not OpenAI's; accepted as vLLM does
    settings = dict(
        prompts=ids,
        max_tokens=_number(body, "max_tokens", 16, 1, max_tokens_cap, integer=True),
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=_number(body, "top_p", 1.0, 0, 1, lo_open=True),
        top_k=top_k,
        n=_number(body, "n", 1, 1, 16, integer=True),
        stop=stop, stream=bool(stream),
        seed=seed if seed is not None else secrets.randbelow(2**31),
        echo=bool(body.get("echo", False)),
    )
    if len(ids) * settings["n"] > 64:
        raise RequestError("at most 64 completions per request (prompts x n)", "n")
    return settings


def error_body(message: str, param=None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def create_app(model, info: dict, *, max_tokens_cap: int = 1024, model_name: str = None):
    """The FastAPI app serving `model` (on its device, in eval mode)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    from .tokenizer import decode

    model.eval()
    name = model_name or Path(info.get("run_folder") or info["source"]).name or "gpt2"
    block_size = model.config.block_size
    app = FastAPI(title="gpt2-speedrun", docs_url=None, redoc_url=None)
    created = int(time.time())

    def jobs(settings):
        """Rows in OpenAI's order: prompt 0 sample 0..n-1, prompt 1 ..."""
        rows = [p for p in settings["prompts"] for _ in range(settings["n"])]
        sampling = dict(temperature=settings["temperature"], top_k=settings["top_k"],
                        top_p=None if settings["top_p"] >= 1 else settings["top_p"], seed=settings["seed"])
        return rows, sampling

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        return JSONResponse(error_body(str(exc), exc.param), status_code=exc.status)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.replace("__MAX_TOKENS__", str(max_tokens_cap))

    @app.get("/info")
    async def model_info():
        return {**info, "model": name, "description": describe(info), "max_tokens": max_tokens_cap}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "gpt2-speedrun"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise RequestError("the request body is not valid JSON") from None
        settings = parse_request(body, block_size=block_size, max_tokens_cap=max_tokens_cap)
        rows, sampling = jobs(settings)
        cid, now = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        echo = [decode(p) if settings["echo"] else "" for p in rows]

        if not settings["stream"]:
            results = []

            def run():
                for _ in stream_text(model, rows, settings["max_tokens"], stop=settings["stop"], stop_ids=(EOT,),
                                     results=results, **sampling):
                    pass
            await run_in_threadpool(run)
            choices = [{"text": echo[i] + r.text, "index": i, "logprobs": None, "finish_reason": r.finish_reason}
                       for i, r in enumerate(results)]
            used = sum(len(r.tokens) for r in results)
            prompt_tokens = sum(len(p) for p in settings["prompts"])
            return {"id": cid, "object": "text_completion", "created": now, "model": name, "choices": choices,
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": used,
                              "total_tokens": prompt_tokens + used}}

        def chunk(i, text, reason):
            return "data: " + json.dumps({"id": cid, "object": "text_completion", "created": now, "model": name,
                                          "choices": [{"text": text, "index": i, "logprobs": None,
                                                       "finish_reason": reason}]}) + "\n\n"

        loop, queue, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def produce():  # in a worker thread: one item per piece of text, then None
            try:
                for item in stream_text(model, rows, settings["max_tokens"], stop=settings["stop"],
                                        stop_ids=(EOT,), **sampling):
                    if cancelled.is_set():
                        return  # the client went away: stop generating
                    loop.call_soon_threadsafe(queue.put_nowait, item)
            except Exception as e:  # reported in the stream; the server goes on
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        async def events():
            worker = threading.Thread(target=produce, daemon=True, name=f"generate-{cid}")
            worker.start()
            try:
                for i, text in enumerate(echo):
                    if text:
                        yield chunk(i, text, None)
                while (item := await queue.get()) is not None:
                    if isinstance(item, Exception):
                        yield "data: " + json.dumps(error_body(f"generation failed: {item}", kind="server_error")) + "\n\n"
                        break
                    yield chunk(*item)
                yield "data: [DONE]\n\n"
            finally:
                cancelled.set()  # also when the client disconnected and this generator was closed or cancelled

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2.serve", description=__doc__.splitlines()[0])
    p.add_argument("--init", required=True, help="run folder, checkpoint, HF folder or hub name (gpt2 ...)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--max-tokens", type=int, default=1024, help="most new tokens one request may ask for")
    p.add_argument("--model-name", default=None, help="the model's id in the API (default: the run folder's name)")
    args = p.parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        print(f"error: python -m gpt2.serve needs the serve extra ({e.name} is missing): "
              "pip install -e \".[serve]\"", file=sys.stderr)
        return UsageError.exit_code
    try:
        if args.max_tokens < 1:
            raise UsageError(f"--max-tokens {args.max_tokens} must be at least 1")
        if not 0 <= args.port <= 65535:
            raise UsageError(f"--port {args.port} must be in 0..65535")
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda, but torch sees no CUDA device: use --device cpu")
        model, info = load_model(args.init)
        app = create_app(model.to(device), info, max_tokens_cap=args.max_tokens, model_name=args.model_name)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return UsageError.exit_code
    print(f"serving {describe(info)} on {device} at http://{args.host}:{args.port}", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    except (OSError, SystemExit) as e:  # port in use, no permission
        print(f"error: --host {args.host} --port {args.port}: cannot listen ({e})", file=sys.stderr)
        return UsageError.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
