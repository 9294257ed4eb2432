"""python -m gpt2.serve: the OpenAI-compatible API (plain, streamed, concurrent, bad input, the openai client),
and the page in a headless browser. A tiny random model from a run folder in tmp_path; no network."""

import json
import threading
import time

import pytest

from gpt2.tokenizer import encode
from helpers import BLOCK, CAP, SERVE_EXTRA, generate_in_page, generating, headless_browser, post

fastapi = pytest.importorskip("fastapi", reason=SERVE_EXTRA)
uvicorn = pytest.importorskip("uvicorn", reason=SERVE_EXTRA)
httpx = pytest.importorskip("httpx", reason="httpx (a dependency of the openai client) is not installed")


def test_models_and_info(server):
    models = httpx.get(f"{server}/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    info = httpx.get(f"{server}/info").json()
    assert info["stage"] == "flash" and info["steps"] == 7 and info["val_loss"] == 10.5 and info["block_size"] == BLOCK
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and "Generate" in page.text and "<textarea" in page.text


def test_plain_completion_shape_and_seed(server):
    body = {"model": "tiny", "prompt": ["Hello", "ROMEO: What"], "max_tokens": 12, "n": 2, "seed": 3,
            "temperature": 0.8, "top_p": 0.9, "some_future_field": {"ignored": True}}
    r = post(server, body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["model"] == "tiny" and out["id"].startswith("cmpl-")
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert all(c["finish_reason"] in ("stop", "length") and c["logprobs"] is None for c in out["choices"])
    usage = out["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] == len(encode("Hello")) + len(encode("ROMEO: What"))
    assert post(server, body).json()["choices"] == out["choices"]  # same seed, same text
    greedy = post(server, {"prompt": "Hello", "max_tokens": 12, "temperature": 0}).json()["choices"][0]
    seeded = {"prompt": "Hello", "max_tokens": 12, "temperature": 0, "seed": 9}
    assert greedy == post(server, seeded).json()["choices"][0]


def test_stream_equals_plain_and_ends_with_done(server):
    body = {"prompt": "Once upon a time", "max_tokens": 20, "seed": 1, "stop": ["the"]}
    plain = post(server, body).json()["choices"][0]
    with httpx.stream("POST", f"{server}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["finish_reason"]


def test_concurrent_requests_do_not_mix(server):
    bodies = [{"prompt": p, "max_tokens": 30, "seed": 5, "temperature": 0.9} for p in ("Alpha", "Beta gamma", "Delta")]
    alone = [post(server, b).json()["choices"][0]["text"] for b in bodies]
    results = [None] * 3

    def run(i):
        with httpx.stream("POST", f"{server}/v1/completions", json={**bodies[i], "stream": True}, timeout=60) as r:
            results[i] = "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                                 if line.startswith("data: {"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    assert httpx.get(f"{server}/v1/models", timeout=5).status_code == 200  # HTTP is not blocked meanwhile
    for t in threads:
        t.join(timeout=60)
    assert results == alone


def test_disconnect_stops_generation(server):
    with httpx.stream("POST", f"{server}/v1/completions", timeout=60,
                      json={"prompt": "Go on and on", "max_tokens": CAP, "stream": True}) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert generating() == 1
    deadline = time.time() + 10
    while generating() and time.time() < deadline:
        time.sleep(0.05)
    assert generating() == 0


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": 5}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x " * (BLOCK + 10)}, "prompt"),
    ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": CAP + 1}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "temperature": -0.5}, "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "hi", "seed": "x"}, "seed"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
])
def test_bad_requests_name_the_field(server, body, param):
    r = post(server, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and param in error["message"]


def test_invalid_json(server):
    r = httpx.post(f"{server}/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_openai_client_plain_and_streamed(server):
    openai = pytest.importorskip("openai", reason="the openai client is not installed (serve extra)")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="not-needed", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    done = client.completions.create(model="tiny", prompt="Hello, I'm a language model,", max_tokens=10, seed=2)
    assert done.choices[0].finish_reason in ("stop", "length") and done.usage.completion_tokens <= 10
    pieces = client.completions.create(model="tiny", prompt="Hello, I'm a language model,", max_tokens=10, seed=2,
                                       stream=True)
    assert "".join(c.choices[0].text for c in pieces) == done.choices[0].text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="hi", max_tokens=CAP + 1)


def test_openai_client_finish_reason_usage_and_errors(server):
    openai = pytest.importorskip("openai", reason="the openai client is not installed (serve extra)")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="not-needed", max_retries=0)
    short = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0, n=2)
    assert [c.finish_reason for c in short.choices] == ["length", "length"]
    assert (short.usage.prompt_tokens, short.usage.completion_tokens) == (len(encode("Hello")), 10)
    full = client.completions.create(model="tiny", prompt="Hello", max_tokens=20, temperature=0).choices[0].text
    stop = full[6:9]
    cut = client.completions.create(model="tiny", prompt="Hello", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == full[:full.index(stop)]
    chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=20, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny", prompt="hi", temperature=3)
    assert refused.value.param == "temperature" and refused.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny", prompt="hi", logprobs=6)  # OpenAI's range: 0..5
    assert refused.value.param == "logprobs" and "<= 5" in refused.value.message


@pytest.mark.slow
def test_page_in_a_headless_browser(server):
    with headless_browser() as driver:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        driver.get(server + "/")
        WebDriverWait(driver, 20).until(lambda d: "stage flash" in d.find_element(By.ID, "model").text)
        assert "val loss 10.5000" in driver.find_element(By.ID, "model").text
        assert not driver.find_element(By.ID, "key_box").is_displayed()  # no key on this server
        generate_in_page(driver)
