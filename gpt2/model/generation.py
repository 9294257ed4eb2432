"""Generation: a KV cache, the sampling controls, prompts of different lengths in one batch, stop strings.

    from gpt2.model.generation import complete, stream
    complete(model, ["Hello, I'm a language model,", "ROMEO:"], max_new_tokens=30, top_p=0.9, seed=1)

How it works:
- The KV cache keeps each layer's keys and values. The prompt is read in one forward pass (the prefill), then
  each new token is one position: a forward pass over 1 token instead of the whole context.
- Prompts of different lengths are left-padded into one batch. The cache carries an attention mask (no
  attention to padding) and per-row positions (each row counts from its own first token), so a row gets
  the same tokens as its prompt generated alone.
- Longer than the context (block_size): the window slides as it does without the cache. Once a row
  holds block_size tokens, each further token is one forward pass over the last block_size tokens, with
  positions counted again from 0 inside that window. This gives the same tokens as the no-cache path,
  and beyond the context it costs what the no-cache path costs. The other choice would be to re-read only
  the last half window and then go on from the cache, which is cheaper but changes the text past the
  context. Exact won.
- Sampling: temperature 0 is greedy (argmax, no randomness), and so is any temperature below GREEDY_BELOW
  (1e-5): there the draw is the argmax anyway (a logit 0.001 below the best weighs e^-100), while dividing
  by a far smaller one overflows to inf and then NaN. Otherwise logits / temperature, then top-k,
  then top-p (the smallest set of tokens whose probability reaches top_p), then one draw. Ids past the
  tokenizer's vocabulary (a padded table, 50304) are cut off before any of this, so they are never produced.
- Speed on a CPU: decoding one token is bound by reading every weight once, and this CPU's matrix-vector
  kernels read a (in, out) matrix about 20 % faster than nn.Linear's (out, in) one. So on a CPU the one-token
  step runs `decode_step` below, the model's own blocks written out with transposed copies of the weights
  (made once per model and kept while its weights are unchanged; they cost one more copy of the weights in
  memory). The prompt, and every window re-read, go through the model itself. Tests hold both to the same tokens.
- Logprobs (OpenAI's `logprobs`): log_softmax of the raw logits of each step, only when asked for; the
  prompt's own (`echo`) take one more forward pass over it. See gpt2/model/logprobs.py.
- Randomness: `seed` gives each row its own generator, seeded seed + row, so a row's text does not depend on
  what else is in the batch (row i of a batch = that prompt alone with seed + i; seeds count modulo 2**64,
  as torch's do, so any integer is a seed). `generator=` (one
  torch.Generator, as model.generate takes) draws for the whole batch in one call, as the seed's sampler did.
"""

import math
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch
from torch.nn import functional as F

from gpt2.model.logprobs import complete_chars, score_prompts, step_logprobs
from gpt2.tokenizer import EOT  # noqa: F401  (sample and serve stop at it; one constant, the tokenizer's)

GREEDY_BELOW = 1e-5  # temperatures below this sample greedily (see the module's docstring)
SEED_SPACE = 2**64  # torch's seeds: an integer is taken modulo this


class LayerCache:
    """One layer's view of the KV cache: `update` stores the new keys/values and returns all seen so far."""

    def __init__(self, cache: "KVCache"):
        self.cache = cache
        self.k = self.v = None

    @property
    def mask(self) -> Optional[torch.Tensor]:
        return self.cache.mask

    def update(self, k: torch.Tensor, v: torch.Tensor):
        c = self.cache
        if self.k is None:  # allocated on first use, in the dtype the layer computes in
            B, nh, _, hs = k.shape
            self.k = k.new_empty(B, nh, c.capacity, hs)
            self.v = v.new_empty(B, nh, c.capacity, hs)
        self.k[:, :, c.start:c.length] = k
        self.v[:, :, c.start:c.length] = v
        return self.k[:, :, :c.length], self.v[:, :, :c.length]


class KVCache:
    """Keys and values of every layer for the positions read so far, preallocated for `capacity` positions.

    Call `step(valid)` with the (B, T) mask of the new positions (False = left padding) before each forward
    pass; it sets `positions` (B, T) and `mask` (B, 1, T, length) that the model reads.
    """

    def __init__(self, n_layer: int, batch_size: int, capacity: int, device):
        self.capacity = capacity
        self.start = self.length = 0
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self.count = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # real tokens per row so far
        self.padded = False
        self.positions = self.mask = None
        self.layers = [LayerCache(self) for _ in range(n_layer)]

    def step(self, valid: torch.Tensor) -> None:
        T = valid.size(1)
        if self.length + T > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; {self.length} + {T} do not fit")
        self.start, self.length = self.length, self.length + T
        self.valid[:, self.start:self.length] = valid
        self.padded = self.padded or not bool(valid.all())
        self.positions = (self.count + valid.long().cumsum(1) - 1).clamp(min=0)
        self.count = self.count + valid.long().sum(1, keepdim=True)
        if T == 1 and not self.padded:
            self.mask = None  # one new position that may see everything before it
            return
        query = torch.arange(self.start, self.length, device=valid.device).view(T, 1)
        key = torch.arange(self.length, device=valid.device).view(1, self.length)
        # causal, and no attention to padding (a padding position sees itself, so that no row is all -inf)
        self.mask = (key <= query) & (self.valid[:, None, :self.length] | (key == query))
        self.mask = self.mask.unsqueeze(1)  # (B, 1, T, length)


_TRANSPOSED = weakref.WeakKeyDictionary()  # model -> (weights' identity, transposed copies)


def transposed_weights(model) -> list:
    """Per layer (ln_1, c_attn W^T + b, c_proj W^T + b, ln_2, c_fc W^T + b, c_proj W^T + b), then ln_f and lm_head^T;
    rebuilt when a weight was changed or replaced."""
    key = tuple((p.data_ptr(), p._version) for p in model.parameters())
    held = _TRANSPOSED.get(model)
    if held is None or held[0] != key:
        def t(linear):
            return linear.weight.detach().t().contiguous(), None if linear.bias is None else linear.bias.detach()
        layers = [(b.ln_1, *t(b.attn.c_attn), *t(b.attn.c_proj), b.ln_2, *t(b.mlp.c_fc), *t(b.mlp.c_proj))
                  for b in model.transformer.h]
        held = (key, (layers, model.transformer.ln_f, model.lm_head.weight.detach().t().contiguous()))
        _TRANSPOSED[model] = held
    return held[1]


def decode_step(model, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """model(idx, cache=cache)[0] for one new position per row (B, 1), with transposed weights: (B, 1, vocab)."""
    layers, ln_f, lm_head_t = transposed_weights(model)
    B, C, nh = idx.size(0), model.config.n_embd, model.config.n_head
    x = (model.transformer.wte(idx) + model.transformer.wpe(cache.positions)).view(B, C)
    for layer_cache, (ln_1, wa, ba, wp, bp, ln_2, wf, bf, wm, bm) in zip(cache.layers, layers):
        q, k, v = torch.addmm(ba, ln_1(x), wa).split(C, dim=1)
        q, k, v = (t.view(B, nh, 1, C // nh) for t in (q, k, v))
        k, v = layer_cache.update(k, v)
        if model.config.attention != "manual":  # flash; flash4's kernel has no KV cache: SDPA here
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            if cache.mask is not None:
                att = att.masked_fill(~cache.mask, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        x = x + torch.addmm(bp, y.view(B, C), wp)
        x = x + torch.addmm(bm, F.gelu(torch.addmm(bf, ln_2(x), wf), approximate="tanh"), wm)
    return (ln_f(x) @ lm_head_t).view(B, 1, -1)


def left_pad(prompts: Sequence[Sequence[int]], device, pad_id: int = 0):
    """(B, T) ids, right-aligned, and the (B, T) mask of real tokens."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(len(prompts), T, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long, device=device)
            valid[i, T - len(p):] = True
    return ids, valid


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator=None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) ids. `generator`: one torch.Generator for the batch, or a list of one per row."""
    logits = logits.float()
    if temperature < GREEDY_BELOW:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        drop = before >= top_p
        drop[:, 0] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g) for i, g in enumerate(generator)])
    return torch.multinomial(probs, num_samples=1, generator=generator)


def row_generators(seed: int, n: int, device) -> list:
    return [torch.Generator(device=device).manual_seed((seed + i) % SEED_SPACE) for i in range(n)]


def prompt_vocab_size(model) -> int:
    """How many token ids a prompt may hold: those the tokenizer has (50257) and the model has rows for; the
    padded rows of a larger table (50304) are never read."""
    return min(model.config.tokenizer_vocab_size, model.config.vocab_size, EOT + 1)


def check_prompt_ids(prompts, vocab: int) -> None:
    """ValueError naming the first prompt that holds an id outside 0..vocab-1."""
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} holds token id {bad[0]}, outside this model's vocabulary of {vocab} "
                             f"ids (0..{vocab - 1})")


def stream(model, prompts, max_new_tokens: int, **sampling) -> Iterator[torch.Tensor]:
    """Yield the (B,) next ids, one step at a time, for the prompts (lists of ids, or a (B, T) tensor).
    `sampling`: temperature, top_k, top_p, seed, generator, use_cache, cancel.

    Stopping is the caller's: stop iterating (rows that are done are still stepped until all are), or set
    `cancel` (a threading.Event, read before every forward pass) from another thread."""
    steps = _steps(model, prompts, max_new_tokens, **sampling)
    try:
        for next_id, _ in steps:
            yield next_id.view(-1)
    finally:
        steps.close()


@torch.no_grad()
def _steps(model, prompts, max_new_tokens: int, *, temperature: float = 1.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, seed: Optional[int] = None, generator=None,
           use_cache: bool = True, cancel=None, logprobs: Optional[int] = None) -> Iterator[tuple]:
    """Yield ((B, 1) next ids, their TokenLogprobs or None) per step. `logprobs`: None, or how many of the
    likeliest tokens each TokenLogprob lists (0..); None costs nothing per step."""
    device = next(model.parameters()).device
    if torch.is_tensor(prompts):
        ids, valid = prompts.to(device), torch.ones_like(prompts, dtype=torch.bool, device=device)
        if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < model.config.vocab_size:
            check_prompt_ids(ids.tolist(), model.config.vocab_size)
    else:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        check_prompt_ids(prompts, model.config.vocab_size)  # else the embedding's IndexError, mid-request
        ids, valid = left_pad(prompts, device)
    if generator is None and seed is not None:
        generator = row_generators(seed, ids.size(0), device)
    block, vocab = model.config.block_size, model.config.tokenizer_vocab_size
    cache = None
    for _ in range(max_new_tokens):
        if cancel is not None and cancel.is_set():
            return
        if use_cache and cache is not None and cache.length < cache.capacity:
            cache.step(valid[:, -1:])
            if device.type == "cpu":
                logits = decode_step(model, ids[:, -1:], cache)
            else:
                logits, _ = model(ids[:, -1:], cache=cache)
        else:  # the first step, a full window, or no cache: read the last block_size positions
            window, window_valid = ids[:, -block:], valid[:, -block:]
            keep = window_valid.any(0).nonzero()[0, 0]  # columns of padding in every row are dropped
            window, window_valid = window[:, keep:], window_valid[:, keep:]
            if not use_cache and bool(window_valid.all()):
                logits, _ = model(window)  # the plain forward pass, as before the cache
            else:
                room = max_new_tokens if use_cache else 0
                cache = KVCache(model.config.n_layer, ids.size(0), min(block, window.size(1) + room), device)
                cache.step(window_valid)
                logits, _ = model(window, cache=cache)
        next_id = sample_next(logits[:, -1, :vocab], temperature, top_k, top_p, generator)
        ids = torch.cat((ids, next_id), dim=1)
        valid = torch.cat((valid, torch.ones_like(next_id, dtype=torch.bool)), dim=1)
        # the raw distribution (before temperature, top-k, top-p), as OpenAI reports it: gpt2/model/logprobs.py
        yield next_id, None if logprobs is None else step_logprobs(logits[:, -1, :vocab], next_id, logprobs)


def generate_ids(model, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """idx (B, T) with max_new_tokens ids appended to every row (model.generate)."""
    steps = [idx] + [t.view(-1, 1) for t in stream(model, idx, max_new_tokens, **kwargs)]
    return torch.cat(steps, dim=1)


# ---- text: stop strings, streamed pieces, echo and logprobs -------------------------------------------

@dataclass
class Completion:
    text: str = ""  # the new text, without the stop string that ended it
    tokens: list = field(default_factory=list)  # the new ids (up to and without a stop token)
    finish_reason: Optional[str] = None  # "stop" (a stop token or string) or "length" (max_new_tokens)
    prompt_tokens: int = 0
    stop_token: Optional[int] = None  # the stop id that ended the row, if one did
    logprobs: Optional[list] = None  # TokenLogprobs when asked for: the echoed prompt's, then every new id's

    @property
    def completion_tokens(self) -> int:
        """The ids generated: `tokens` and the stop token, which was sampled like any other (as vLLM and
        transformers count it)."""
        return len(self.tokens) + (self.stop_token is not None)


class _Row:
    """One row's text so far: which part may be shown yet, and whether a stop string has ended it."""

    def __init__(self, stop: Sequence[str], decode, prompt_tokens: int, prompt_chars: int = 0):
        self.stop, self.decode = [s for s in stop if s], decode
        self.out = Completion(prompt_tokens=prompt_tokens)
        self.shown = 0  # characters handed out
        self.decoded, self.prompt_chars = "", prompt_chars  # all new ids decoded; where their text starts

    def add(self, token: int, stop_ids, logprob=None) -> str:
        """Take one new token (and its TokenLogprob, when asked for); return the text that is now safe to show."""
        if logprob is not None:
            logprob.offset = self.prompt_chars + complete_chars(self.decoded)
            self.out.logprobs.append(logprob)
        if token in stop_ids:
            self.out.finish_reason, self.out.stop_token = "stop", token
            return self.flush()
        self.out.tokens.append(token)
        text = self.decoded = self.decode(self.out.tokens)
        hits = [i for i in (text.find(s, max(0, self.shown - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.out.text, self.out.finish_reason = text[:min(hits)], "stop"
            return self.flush()
        self.out.text = text
        safe = len(text)
        while safe > self.shown and text[safe - 1] == "\ufffd":  # half of a multi-byte character
            safe -= 1
        for s in self.stop:  # hold back an ending that may grow into a stop string
            for n in range(min(len(s) - 1, safe - self.shown), 0, -1):
                if text[:safe].endswith(s[:n]):
                    safe -= n
                    break
        piece, self.shown = text[self.shown:safe], max(self.shown, safe)
        return piece

    def flush(self) -> str:
        piece, self.shown = self.out.text[self.shown:], len(self.out.text)
        return piece


def _encode_all(prompts, encode):
    return [list(p) if not isinstance(p, str) else encode(p) for p in prompts]


def stream_text(model, prompts: Sequence[Union[str, Sequence[int]]], max_new_tokens: int, *,
                stop: Sequence[str] = (), stop_ids: Sequence[int] = (EOT,), encode=None, decode=None,
                results: Optional[list] = None, echo: bool = False, logprobs: Optional[int] = None,
                **sampling) -> Iterator[tuple]:
    """Yield (row, text piece, finish_reason or None) as text is produced; each row ends with one item whose
    finish_reason is set. Prompts are text (or lists of ids); `sampling`: temperature, top_k, top_p, seed,
    generator, use_cache, cancel (see `stream`). The stop string itself is never shown. `results`, a list, receives
    one Completion per row (text, tokens, finish_reason, prompt_tokens, ...), filled in as the rows go.
    `echo`: each row first yields its prompt's text (which Completion.text leaves out). `logprobs` (k >= 0):
    each Completion's `logprobs` gets a TokenLogprob per new id (the stop token too) as it comes, after the
    prompt's own when echoing (gpt2/model/logprobs.py); offsets count characters from the start of the prompt."""
    encode, decode = _tokenizer(encode, decode)
    ids = _encode_all(prompts, encode)
    texts = [decode(p) if echo or logprobs is not None else "" for p in ids]
    rows = [_Row(stop, decode, len(p), len(text)) for p, text in zip(ids, texts)]
    if results is not None:
        results.extend(row.out for row in rows)
    if logprobs is not None:  # each row's logprobs start empty, or (echo) with its prompt's
        for row, scored in zip(rows, score_prompts(model, ids, logprobs, decode) if echo else [[]] * len(rows)):
            row.out.logprobs = list(scored)
    if echo:
        for i, text in enumerate(texts):
            yield i, text, None
    stop_ids = set(stop_ids)
    if max_new_tokens <= 0:
        for i, row in enumerate(rows):
            row.out.finish_reason = "length"
            yield i, "", "length"
        return
    steps = _steps(model, ids, max_new_tokens, logprobs=logprobs, **sampling)
    try:
        for step, (next_ids, scored) in enumerate(steps, start=1):
            for i, token in enumerate(next_ids.view(-1).tolist()):
                row = rows[i]
                if row.out.finish_reason:
                    continue
                piece = row.add(token, stop_ids, None if scored is None else scored[i])
                if not row.out.finish_reason and step == max_new_tokens:
                    row.out.finish_reason = "length"
                    piece += row.flush()
                if piece or row.out.finish_reason:
                    yield i, piece, row.out.finish_reason
            if all(r.out.finish_reason for r in rows):
                break
    finally:
        steps.close()  # a caller that stops listening stops the generation


def complete(model, prompts: Sequence[Union[str, Sequence[int]]], max_new_tokens: int, **kwargs) -> list:
    """One Completion per prompt (text, tokens, finish_reason, prompt_tokens); the arguments of stream_text."""
    results = []
    for _ in stream_text(model, prompts, max_new_tokens, results=results, **kwargs):
        pass
    return results


def _tokenizer(encode, decode):
    if encode is None or decode is None:
        from gpt2.tokenizer import decode as _decode, encode as _encode
        encode, decode = encode or _encode, decode or _decode
    return encode, decode
