"""Talk to a model: a web page and an OpenAI-compatible completions API.

    python -m gpt2.serve --init outputs/2026-11-25/10-00-00_flash     # then open http://127.0.0.1:8000
    python -m gpt2.serve --init gpt2 --port 8080 --device cpu --max-tokens 512

    GET  /                 the page: prompt, sampling controls, Generate, the text as it streams in
    GET  /v1/models        the one model
    POST /v1/completions   OpenAI's completions request and response (stream: server-sent events, then [DONE]);
                           logprobs, echo, n, seed, stop, usage and finish_reason as OpenAI's: gpt2/serving/response.py
    GET  /info             what is loaded: run folder, stage, steps, validation loss

Needs the `serve` extra: pip install -e ".[serve]". It listens on 127.0.0.1; safe to put on a network with an
API key (--api-key), and these hold for every request:
- who: the Host header must name this server (DNS rebinding), the key when one is set, JSON bodies only
  (no simple cross-origin POST from a web page): gpt2/serving/access.py
- what: the body's size, every field's type and range, the caps on tokens, prompts, completions and stop
  strings, all checked before generating (400/413 naming the limit): gpt2/serving/request.py
- how much: at most --max-concurrent generations at once (429 beyond), each in a worker thread of its own,
  stopped between two tokens when its client goes away, streamed or not: gpt2/serving/worker.py
Temperatures below 1e-5 are greedy (as 0). Every error is OpenAI's shape {"error": {"message", "type",
"param", "code"}}, never a traceback; the server's log keeps those.
"""

import argparse
import os
import secrets
import sys
import time
from pathlib import Path

from gpt2.training.devices import pick_device
from gpt2.errors import UsageError, command
from gpt2.model.generation import prompt_vocab_size
from gpt2.runs.loading import describe, load_model
from gpt2.serving.access import KEY_ENV, AccessGuard, allowed_hosts, exposure_warning
from gpt2.serving.page import page
from gpt2.serving.request import Limits, RequestError, error_body, parse_completion, read_body
from gpt2.serving.response import Reply
from gpt2.serving.worker import Generation, Slots

PUBLIC_INFO = ("source", "kind", "run_folder", "stage", "steps", "val_loss", "params", "block_size")


def public_info(info: dict) -> dict:
    """What /info tells a client: the known keys only, and a folder or file by its name, never this machine's
    path to it."""
    out = {key: info.get(key) for key in PUBLIC_INFO if key in info}
    if out.get("run_folder"):
        out["run_folder"] = Path(out["run_folder"]).name
    source = Path(str(out.get("source") or "")).expanduser()
    if out.get("source") and (source.is_absolute() or source.exists()):
        out["source"] = source.name
    return out


def create_app(model, info: dict, *, max_tokens_cap: int = 1024, model_name: str = None, api_key: str = None,
               hosts: frozenset = None, max_concurrent: int = 4, max_batch: int = 16,
               max_body_bytes: int = 1 << 20):
    """The FastAPI app serving `model` (on its device, in eval mode). `hosts`: the Host names it answers to
    (default: this machine's); `api_key`: required of every request but the page's, when given."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    from gpt2.tokenizer import decode, encode

    model.eval()
    shown = public_info(info)
    name = model_name or shown.get("run_folder") or shown.get("source") or "gpt2"
    limits = Limits(context=model.config.block_size, vocab=prompt_vocab_size(model), max_tokens=max_tokens_cap,
                    max_batch=max_batch, max_body_bytes=max_body_bytes)
    slots, created = Slots(max_concurrent), int(time.time())
    app = FastAPI(title="gpt2-speedrun", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(AccessGuard, hosts=hosts or allowed_hosts("127.0.0.1"), api_key=api_key)

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        return JSONResponse(error_body(str(exc), exc.param, exc.kind, exc.code), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):  # 404, 405: in OpenAI's shape too
        return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _server_error(request, exc: Exception):  # a bug: one line to the client; uvicorn logs the traceback
        return JSONResponse(error_body(f"the server failed ({type(exc).__name__}); its log has the details",
                                       kind="server_error"), status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page(max_tokens_cap, key_required=api_key is not None)

    @app.get("/info")
    async def model_info():
        return {**shown, "model": name, "description": describe(shown), "max_tokens": max_tokens_cap}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "gpt2-speedrun"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        raw = await read_body(request, limits.max_body_bytes)
        job = await run_in_threadpool(parse_completion, raw, limits, encode)  # tokenizing is not for the loop
        reply = Reply(f"cmpl-{secrets.token_hex(12)}", int(time.time()), name, job, decode)
        generation = Generation(model, job, slots, reply.cid, streaming=job.stream)  # 429 when all are busy
        if job.stream:
            return StreamingResponse(reply.events(generation), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(generation.cancel))  # also if never iterated
        results = await generation.finish(request)  # stops generating if the client goes away
        if generation.error is not None:
            raise RequestError(generation.failure(), status=500, kind="server_error")
        return reply.body(results)

    return app


def _check(args) -> None:
    for option in ("max_tokens", "max_concurrent", "max_batch", "max_body_bytes"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')} {getattr(args, option)} must be at least 1")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} must be in 0..65535")
    if args.api_key == "":
        raise UsageError(f"--api-key is empty: give the key clients must send (or set {KEY_ENV})")


def kv_cache_gib(model, rows: int) -> float:
    """The KV cache of `rows` rows at full context, in GiB: keys and values of every layer."""
    c, size = model.config, next(model.parameters()).element_size()
    return rows * 2 * c.n_layer * c.block_size * c.n_embd * size / 2**30


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for every other bad input
        self.exit(2, f"error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="python -m gpt2.serve", description=__doc__.splitlines()[0])
    p.add_argument("--init", required=True, help="run folder, checkpoint, HF folder or hub name (gpt2 ...)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only; "
                                                       "any other prints a warning)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--max-tokens", type=int, default=1024, help="most new tokens one completion may ask for")
    p.add_argument("--model-name", default=None, help="the model's id in the API (default: the run folder's name)")
    p.add_argument("--api-key", default=os.environ.get(KEY_ENV) or None,
                   help=f"require 'Authorization: Bearer KEY' of every request but the page's (default: ${KEY_ENV}, "
                        "which keeps the key out of the process list; unset: no key)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a Host name clients may use besides localhost, 127.0.0.1, [::1] and --host (a name that "
                        "points here, or a proxy's); repeatable; '*' allows any")
    p.add_argument("--max-concurrent", type=int, default=4,
                   help="generations running at once (default 4); one more gets 429 with Retry-After. Each holds "
                        "a KV cache of up to --max-batch rows, so this bounds memory too (printed at start)")
    p.add_argument("--max-batch", type=int, default=16, help="completions per request, prompts x n (default 16)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body in bytes (default 1 MiB); a larger one gets 413 before it is read")
    return p.parse_args(argv)


@command()
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        print(f"error: python -m gpt2.serve needs the serve extra ({e.name} is missing): "
              "pip install -e \".[serve]\"", file=sys.stderr)
        return UsageError.exit_code
    _check(args)
    device = pick_device(args.device, "--device")
    model, info = load_model(args.init)
    app = create_app(model.to(device), info, max_tokens_cap=args.max_tokens, model_name=args.model_name,
                     api_key=args.api_key, hosts=allowed_hosts(args.host, args.allow_host),
                     max_concurrent=args.max_concurrent, max_batch=args.max_batch,
                     max_body_bytes=args.max_body_bytes)
    warning = exposure_warning(args.host, args.port, args.api_key)
    if warning:
        print(warning, file=sys.stderr)
    print(f"serving {describe(public_info(info))} on {device} at http://{args.host}:{args.port}; at most "
          f"{args.max_concurrent} generations at once, their KV caches up to "
          f"{kv_cache_gib(model, args.max_concurrent * args.max_batch):.2f} GiB", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    except (OSError, SystemExit) as e:  # port in use, no permission
        print(f"error: --host {args.host} --port {args.port}: cannot listen ({e})", file=sys.stderr)
        return UsageError.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
