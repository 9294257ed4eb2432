"""The generations of `python -m gpt2.serve`: each request's in a worker thread of its own, off the event loop,
a bounded number at once, each stopped between two tokens when its client goes away.

The bound (--max-concurrent) shares the machine fairly (a request beyond it gets 429 at once rather than a
long wait) and bounds memory: each running generation holds a KV cache for its rows.
"""

import asyncio
import logging
import threading

from gpt2.model.generation import EOT, stream_text
from gpt2.serving.request import Completion, RequestError

log = logging.getLogger("gpt2.serve")
RETRY_AFTER_S = 1  # what a refused client is told to wait
POLL_S = 0.1  # how often a plain (not streamed) request checks that its client is still there


class Slots:
    """At most `limit` generations at once. Taken on the event loop, given back by the worker thread when its
    generation has really ended, so the bound holds for compute and memory, not only for open responses."""

    def __init__(self, limit: int):
        self.limit, self.busy, self.lock = limit, 0, threading.Lock()

    def take(self) -> None:
        with self.lock:
            if self.busy >= self.limit:
                raise RequestError(f"the server is running its limit of {self.limit} generations at once "
                                   "(--max-concurrent); retry shortly", status=429, kind="requests",
                                   code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
            self.busy += 1

    def give_back(self) -> None:
        with self.lock:
            self.busy -= 1


class Generation:
    """One request's generation in a worker thread. `pieces()` streams (row, text, finish_reason, logprobs);
    `finish()` waits for the end; `cancel()` stops it before its next forward pass. Holds a slot until the
    thread ends."""

    def __init__(self, model, request: Completion, slots: Slots, name: str, *, streaming: bool):
        slots.take()  # 429 here, before any thread or response exists
        self.model, self.request, self.slots, self.streaming = model, request, slots, streaming
        self.results, self.error = [], None
        self.cancelled, self.done = threading.Event(), asyncio.Event()
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"generate-{name}")
        self.thread.start()

    def _run(self):
        r, sent = self.request, [0] * len(self.request.rows)
        try:
            for i, piece, reason in stream_text(self.model, r.rows, r.max_tokens, stop=r.stop, stop_ids=(EOT,),
                                                results=self.results, cancel=self.cancelled, echo=r.echo,
                                                logprobs=r.logprobs, **r.sampling):
                if self.streaming:
                    self._post(self.queue.put_nowait, (i, piece, reason, self._new_logprobs(i, sent)))
        except Exception as e:  # the operator's log gets the traceback, the client one line
            log.exception("generation %s failed", self.thread.name)
            self.error = e
        finally:
            self.slots.give_back()
            self._post(self.queue.put_nowait, None)
            self._post(self.done.set)

    def _new_logprobs(self, i: int, sent: list):
        """Row i's TokenLogprobs since its last piece (None when not asked for), read in the generating thread."""
        if self.request.logprobs is None:
            return None
        new = self.results[i].logprobs[sent[i]:]
        sent[i] += len(new)
        return new

    def _post(self, call, *args):
        try:
            self.loop.call_soon_threadsafe(call, *args)
        except RuntimeError:  # the server has shut down its event loop: nobody is listening
            pass

    def cancel(self) -> None:
        self.cancelled.set()

    async def pieces(self):
        """(row, text piece, finish_reason or None, TokenLogprobs of its tokens or None) as they come, until the
        generation ends. With echo, each row's first piece is its prompt."""
        while (item := await self.queue.get()) is not None:
            yield item

    async def finish(self, request) -> list:
        """The Completions of every row; cancels the generation if the client disconnects meanwhile."""
        while not self.done.is_set():
            try:
                await asyncio.wait_for(self.done.wait(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.cancel()
        return self.results

    def failure(self) -> str:
        return f"generation failed ({type(self.error).__name__}); the server's log has the details"
