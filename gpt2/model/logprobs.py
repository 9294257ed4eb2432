"""Token log-probabilities, as OpenAI's completions API reports them (`logprobs`, `echo`).

Every logprob here is the model's raw distribution: log_softmax of its logits over the tokenizer's vocabulary
(50257 ids; the rows of a padded table are never a token), before temperature, top-k or top-p. That is what
OpenAI reports, so a value does not depend on the sampling settings of the request, and a greedy token is
always the first of its top list. Nothing here runs unless a request asks for logprobs.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch.nn import functional as F


@dataclass
class TokenLogprob:
    """One token of a completion (or of its echoed prompt) and what the model thought of it."""
    token: int
    logprob: Optional[float]  # None for a prompt's first token: nothing comes before it to predict it
    top: Optional[list]  # [(id, logprob)], the k likeliest, likeliest first; None where logprob is None
    offset: int = 0  # characters of text before this token, counted from the start of the prompt


def step_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> list:
    """(B, V) logits of one step and the (B, 1) ids drawn from them: one TokenLogprob per row (offset unset)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(1, chosen).view(-1).tolist()
    top_values, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], chosen[:, :0])
    return [TokenLogprob(t, lp, list(zip(ids, values)))
            for t, lp, ids, values in zip(chosen.view(-1).tolist(), picked, top_ids.tolist(), top_values.tolist())]


@torch.no_grad()
def prompt_logprobs(model, prompt: list, k: int, vocab: int, decode) -> list:
    """The prompt's tokens scored by one forward pass over it (so it must fit the context):
    token j's logprob is that of the model reading tokens 0..j-1. The first has none, as in OpenAI."""
    if not 0 < len(prompt) <= model.config.block_size or not 0 <= min(prompt) <= max(prompt) < vocab:
        raise ValueError(f"a prompt to score needs 1..{model.config.block_size} tokens (the model's context), "
                         f"each an id in 0..{vocab - 1}")
    device = next(model.parameters()).device
    ids = torch.as_tensor(prompt, dtype=torch.long, device=device).view(1, -1)
    logits, _ = model(ids)
    scored = step_logprobs(logits[0, :-1, :vocab], ids[0, 1:].view(-1, 1), k) if len(prompt) > 1 else []
    out = [TokenLogprob(prompt[0], None, None)] + scored
    for j, entry in enumerate(out):
        entry.offset = complete_chars(decode(prompt[:j])) if j else 0
    return out


def score_prompts(model, prompts: list, k: int, decode) -> list:
    """prompt_logprobs of each prompt (lists of ids), one forward pass per distinct prompt."""
    scored = {}
    for p in prompts:
        if tuple(p) not in scored:
            scored[tuple(p)] = prompt_logprobs(model, p, k, model.config.tokenizer_vocab_size, decode)
    return [scored[tuple(p)] for p in prompts]


def complete_chars(text: str) -> int:
    """len(text) without a trailing half character (decoded as U+FFFD): where the next token's text starts."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    return end
