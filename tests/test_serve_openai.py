"""python -m gpt2.serve as OpenAI's own client uses it: logprobs (values against the model's log_softmax computed
here), echo, n, seed, usage and finish_reason, plain and streamed, over loopback. Tiny random models; no network."""

import json

import pytest
import torch
from torch.nn import functional as F

from helpers import CAP, SERVE_EXTRA, post, serving, tiny_run

pytest.importorskip("fastapi", reason=SERVE_EXTRA)
pytest.importorskip("uvicorn", reason=SERVE_EXTRA)
openai = pytest.importorskip("openai", reason="the openai client is not installed (serve extra)")
httpx = pytest.importorskip("httpx")

from gpt2.model.generation import EOT  # noqa: E402
from gpt2.serve import create_app  # noqa: E402
from gpt2.serving.response import token_text  # noqa: E402
from gpt2.tokenizer import decode, encode, get_tokenizer  # noqa: E402

VOCAB = 50257  # the tokenizer's ids; the model's table is padded to 50304


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(openai client, base URL, the served model) for a tiny random model."""
    model, info = tiny_run(tmp_path_factory.mktemp("openai"))
    with serving(create_app(model, info, max_tokens_cap=CAP, model_name="tiny")) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0), url, model


def token_id(name: str) -> int:
    """The id of a token as logprobs names it (its text, or bytes:\\xNN... for part of a character)."""
    raw = bytes(int(h, 16) for h in name[6:].split("\\x")[1:]) if name.startswith("bytes:") else name.encode()
    return get_tokenizer().encode_single_token(raw)


@torch.no_grad()
def model_logprobs(model, ids) -> torch.Tensor:
    """(T, 50257): log_softmax of the model's logits at each position of `ids`, over the tokenizer's ids."""
    logits, _ = model(torch.tensor([ids]))
    return F.log_softmax(logits[0, :, :VOCAB].float(), dim=-1)


def joined(chunks, index=0) -> dict:
    """The logprobs of one choice's streamed chunks, concatenated."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        for choice in c.choices:
            if choice.index == index:
                for key in out:
                    out[key] += getattr(choice.logprobs, key)
    return out


def as_dict(logprobs) -> dict:
    return {key: getattr(logprobs, key) for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def test_logprobs_are_the_models_raw_log_softmax(served):
    client, _, model = served
    prompt = "Hello world"
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0.7, top_p=0.9, seed=4,
                                    logprobs=3)
    choice, P = out.choices[0], len(encode(prompt))
    lp = choice.logprobs
    generated = [token_id(t) for t in lp.tokens]
    assert len(generated) == out.usage.completion_tokens == 8 and choice.finish_reason == "length"
    assert decode(generated) == choice.text
    expected = model_logprobs(model, encode(prompt) + generated)  # before temperature and top-p, as OpenAI
    for j, (token, value, top) in enumerate(zip(generated, lp.token_logprobs, lp.top_logprobs)):
        row = expected[P - 1 + j]
        assert value == pytest.approx(row[token].item(), abs=1e-4)
        best = row.topk(3)
        names = [token_text(i) for i in best.indices.tolist()]
        assert list(top)[:3] == names and len(top) == 3 + (token not in best.indices.tolist())
        assert [top[n] for n in names] == pytest.approx(best.values.tolist(), abs=1e-4) and top[lp.tokens[j]] == value
    assert lp.text_offset == [len(prompt) + len(decode(generated[:j])) for j in range(8)]  # from the prompt's start


def test_greedy_tokens_are_the_first_of_their_top_logprobs(served):
    client, _, _ = served
    for k in (0, 1, 5):
        lp = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=6, temperature=0,
                                       logprobs=k).choices[0].logprobs
        for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            assert len(top) == max(k, 1) and list(top)[0] == token and top[token] == value == max(top.values())


def test_echo_scores_the_prompt(served):
    client, _, model = served
    prompt = "ROMEO: What light"
    ids = encode(prompt)
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2)
    choice, P = out.choices[0], len(ids)
    lp = choice.logprobs
    assert choice.text.startswith(prompt) and len(lp.tokens) == P + 3 == P + out.usage.completion_tokens
    assert [token_id(t) for t in lp.tokens[:P]] == ids
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing before the first token
    expected = model_logprobs(model, ids + [token_id(t) for t in lp.tokens[P:]])
    for j in range(1, P + 3):
        assert lp.token_logprobs[j] == pytest.approx(expected[j - 1, token_id(lp.tokens[j])].item(), abs=1e-4)
    every = [token_id(t) for t in lp.tokens]
    assert lp.text_offset == [len(decode(every[:j])) for j in range(P + 3)]
    assert all(choice.text[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens))  # offsets index the text
    scored = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0  # scoring only, as lm-eval asks
    assert as_dict(scored.choices[0].logprobs)["token_logprobs"][1:] == pytest.approx(lp.token_logprobs[1:P])
    assert scored.choices[0].finish_reason == "length"


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_logprobs_are_the_plain_ones_chunk_by_chunk(served, echo):
    client, _, _ = served
    body = dict(model="tiny", prompt=["Once upon", "a time"], max_tokens=10, seed=8, n=2, logprobs=2, echo=echo)
    plain = client.completions.create(**body)
    chunks = list(client.completions.create(**body, stream=True))
    for choice in plain.choices:
        mine = [c for c in chunks if c.choices[0].index == choice.index]
        assert "".join(c.choices[0].text for c in mine) == choice.text
        assert joined(chunks, choice.index) == as_dict(choice.logprobs)
        for c in mine:  # each chunk carries the tokens of its own text (part of a character: held back till whole)
            names = "".join(c.choices[0].logprobs.tokens)
            assert names == c.choices[0].text or "bytes:" in names


def test_n_choices_seed_and_usage(served):
    client, _, _ = served
    body = dict(model="tiny", prompt=["Alpha", "Beta gamma"], max_tokens=7, temperature=1.0, n=2, seed=11,
                logprobs=1, echo=True)
    out = client.completions.create(**body)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text.startswith("Alpha") for c in out.choices] == [True, True, False, False]  # prompt 0's n first
    assert all(c.text.startswith("Beta gamma") for c in out.choices[2:])
    assert out.choices[0].text != out.choices[1].text  # the n completions of a prompt differ (seed + row)
    again = client.completions.create(**body)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # same seed, same completions
    assert [as_dict(c.logprobs) for c in again.choices] == [as_dict(c.logprobs) for c in out.choices]
    other = client.completions.create(**{**body, "seed": 12})
    assert [c.text for c in other.choices] != [c.text for c in out.choices]
    prompts = len(encode("Alpha")) + len(encode("Beta gamma"))
    generated = sum(len(c.logprobs.tokens) for c in out.choices) - 2 * prompts  # echo: the prompts' tokens too
    assert out.usage.prompt_tokens == prompts  # each prompt once, however many completions it has
    assert out.usage.completion_tokens == generated == 4 * 7
    assert out.usage.total_tokens == prompts + generated
    assert all(c.finish_reason == "length" for c in out.choices)


def test_stop_string_ends_the_text_but_its_tokens_are_counted(served):
    client, _, _ = served
    full = client.completions.create(model="tiny", prompt="Hello", max_tokens=20, temperature=0, logprobs=0)
    text = full.choices[0].text
    stop = text[8:11]
    cut = client.completions.create(model="tiny", prompt="Hello", max_tokens=20, temperature=0, logprobs=0, stop=stop)
    choice = cut.choices[0]
    assert choice.finish_reason == "stop" and choice.text == text[:text.index(stop)]
    n = cut.usage.completion_tokens
    assert len(choice.logprobs.tokens) == n < 20 and "".join(choice.logprobs.tokens).startswith(choice.text)
    assert choice.logprobs.tokens == full.choices[0].logprobs.tokens[:n]
    assert stop in "".join(choice.logprobs.tokens)  # the token holding the stop string is the last one


@pytest.fixture(scope="module")
def says_nothing(tmp_path_factory):
    """A model whose likeliest token is always <|endoftext|>: (client, URL)."""
    model, info = tiny_run(tmp_path_factory.mktemp("eot"))
    with torch.no_grad():
        ln_f = model.transformer.ln_f
        ln_f.weight.zero_()
        ln_f.bias.copy_(torch.randn(ln_f.bias.shape))  # every position's final state: this vector
        model.lm_head.weight[EOT] = 10 * ln_f.bias  # ... whose best token is EOT
    with serving(create_app(model, info, max_tokens_cap=CAP)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0), url


def test_endoftext_stops_and_is_counted(says_nothing):
    client, _ = says_nothing
    out = client.completions.create(model="m", prompt="Hello", max_tokens=5, temperature=0, logprobs=1)
    choice = out.choices[0]
    assert choice.text == "" and choice.finish_reason == "stop"
    assert out.usage.completion_tokens == 1 and out.usage.total_tokens == len(encode("Hello")) + 1  # sampled: counted
    assert choice.logprobs.tokens == ["<|endoftext|>"] and choice.logprobs.text_offset == [len("Hello")]
    chunks = list(client.completions.create(model="m", prompt="Hello", max_tokens=5, temperature=0, logprobs=1,
                                            stream=True))
    assert [c.choices[0].finish_reason for c in chunks] == ["stop"] and joined(chunks) == as_dict(choice.logprobs)
    assert client.completions.create(model="m", prompt="Hello", max_tokens=5, temperature=0).choices[0].logprobs is None


@pytest.mark.parametrize("value", [6, -1, 1.5, True, "2", [1]])
def test_bad_logprobs_are_named(served, value):
    _, url, _ = served
    for stream in (False, True):
        r = post(url, {"prompt": "hi", "logprobs": value, "stream": stream})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs", r.text


def test_zero_tokens_need_echo(served):
    _, url, _ = served
    r = post(url, {"prompt": "hi", "max_tokens": 0, "logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = post(url, {"prompt": "hi", "max_tokens": 0, "echo": True, "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == "hi" and events[-1]["choices"][0]["finish_reason"] == \
        "length" and events[0]["choices"][0]["logprobs"] is None
