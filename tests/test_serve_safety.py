"""python -m gpt2.serve exposed: the API key, the Host check, JSON-only POSTs, the body limit, the caps named in
400s, hostile values (no 500), a smaller-vocabulary model, the concurrency bound (429) and a plain request whose
client goes away. Each against the real server over loopback; tiny random models; no network."""

import json
import shutil
import subprocess
import time

import pytest

from helpers import BLOCK, CAP, SERVE_EXTRA, generate_in_page, generating, headless_browser, post, serving, tiny_run

pytest.importorskip("fastapi", reason=SERVE_EXTRA)
pytest.importorskip("uvicorn", reason=SERVE_EXTRA)
httpx = pytest.importorskip("httpx")

from gpt2.serve import create_app, parse_args  # noqa: E402
from gpt2.serving.access import KEY_ENV, allowed_hosts, exposure_warning  # noqa: E402
from gpt2.serving.page import page  # noqa: E402

KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def error_of(r, status):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in r.text
    return error


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A server with an API key, one extra Host name and a 2000-byte body limit."""
    model, info = tiny_run(tmp_path_factory.mktemp("guarded"))
    app = create_app(model, info, max_tokens_cap=CAP, api_key=KEY, hosts=allowed_hosts("127.0.0.1", ["my.box"]),
                     max_body_bytes=2000)
    app.get("/boom")(lambda: 1 / 0)  # a bug in a route: the catch-all's case
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """A server running one generation at a time, its model slowed to ~2 ms a token; `calls` counts its forward
    passes (the token embedding runs once per step in the model's forward and in the CPU decode step)."""
    model, info = tiny_run(tmp_path_factory.mktemp("slow"))
    calls = []

    def count_and_wait(*_):
        calls.append(1)
        time.sleep(0.002)
    model.transformer.wte.register_forward_hook(count_and_wait)
    with serving(create_app(model, info, max_tokens_cap=CAP, max_concurrent=1)) as url:
        yield url, calls


def settle(calls, quiet_s=0.5, limit_s=15):
    """Wait until no forward pass ran for quiet_s; the number of passes then."""
    deadline, seen = time.time() + limit_s, -1
    while time.time() < deadline and len(calls) != seen:
        seen = len(calls)
        time.sleep(quiet_s)
    return len(calls)


def test_api_key_is_required_but_the_page_is_open(guarded):
    for path in ("/info", "/v1/models"):
        assert error_of(httpx.get(guarded + path), 401)["code"] == "invalid_api_key"
        assert httpx.get(guarded + path, headers=AUTH).status_code == 200
    missing = post(guarded, {"prompt": "hi", "max_tokens": 2})
    assert "Authorization: Bearer" in error_of(missing, 401)["message"] and missing.headers["www-authenticate"]
    wrong = post(guarded, {"prompt": "hi", "max_tokens": 2}, headers={"Authorization": f"Bearer {KEY}x"})
    assert "incorrect" in error_of(wrong, 401)["message"]
    assert error_of(post(guarded, {"prompt": "hi"}, headers={"Authorization": KEY}), 401)  # no Bearer
    assert post(guarded, {"prompt": "hi", "max_tokens": 2}, headers=AUTH).status_code == 200
    index = httpx.get(guarded + "/")
    assert index.status_code == 200 and 'id="api_key"' in index.text and "KEY_REQUIRED = true" in index.text


def test_openai_client_sends_the_key(guarded):
    openai = pytest.importorskip("openai")
    good = openai.OpenAI(base_url=f"{guarded}/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model="tiny", prompt="Hello", max_tokens=3).choices[0].text is not None
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded}/v1", api_key="wrong", max_retries=0).models.list()


def test_key_from_the_environment(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "from-env")
    assert parse_args(["--init", "x"]).api_key == "from-env"
    assert parse_args(["--init", "x", "--api-key", "given"]).api_key == "given"
    monkeypatch.setenv(KEY_ENV, "")
    assert parse_args(["--init", "x"]).api_key is None
    assert parse_args(["--init", "x"]).host == "127.0.0.1"  # this machine only, unless told


def test_body_size_is_limited_before_reading(guarded):
    big = json.dumps({"prompt": "x" * 3000}).encode()
    headers = {**AUTH, "Content-Type": "application/json"}
    r = httpx.post(f"{guarded}/v1/completions", content=big, headers=headers)
    assert "2000 bytes" in error_of(r, 413)["message"] and "--max-body-bytes" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: refused while reading
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 100
        yield b'"}'
    r = httpx.post(f"{guarded}/v1/completions", content=chunked(), headers=headers)
    assert "content-length" not in r.request.headers and "2000 bytes" in error_of(r, 413)["message"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None])
def test_posts_must_be_json(guarded, content_type):
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    r = httpx.post(f"{guarded}/v1/completions", content=b'{"prompt": "hi", "max_tokens": 2}', headers=headers)
    assert "application/json" in error_of(r, 415)["message"]
    ok = {**AUTH, "Content-Type": "application/json; charset=utf-8"}
    assert httpx.post(f"{guarded}/v1/completions", content=b'{"prompt": "hi", "max_tokens": 2}',
                      headers=ok).status_code == 200


def test_host_header_must_name_this_server(guarded, server):
    port = guarded.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
        r = httpx.get(guarded + "/v1/models", headers={**AUTH, "Host": host})
        assert "--allow-host" in error_of(r, 421)["message"]
    for host in (f"my.box:{port}", "MY.BOX", f"localhost:{port}", f"[::1]:{port}"):  # --allow-host my.box
        assert httpx.get(guarded + "/v1/models", headers={**AUTH, "Host": host}).status_code == 200, host
    assert httpx.get(server + "/", headers={"Host": "my.box"}).status_code == 421  # not allowed there
    assert "*" in allowed_hosts("0.0.0.0", ["*"]) and "0.0.0.0" not in allowed_hosts("0.0.0.0")
    assert "[::1]" in allowed_hosts("::1") and "10.0.0.5" in allowed_hosts("10.0.0.5")


def test_info_holds_no_local_path(server, guarded, tmp_path_factory):
    info = httpx.get(server + "/info").json()
    assert info["run_folder"] and "/" not in info["run_folder"] and "/" not in info["source"]
    text = json.dumps(info)
    assert str(tmp_path_factory.getbasetemp()) not in text and "checkpoint.pt" not in text
    assert json.loads(text)["description"].startswith(info["run_folder"])


@pytest.mark.parametrize("args, option", [
    (["--max-concurrent", "0"], "--max-concurrent"), (["--max-batch", "0"], "--max-batch"),
    (["--max-body-bytes", "-1"], "--max-body-bytes"), (["--api-key", ""], "--api-key"),
    (["--max-concurrent", "many"], "--max-concurrent"),
])
def test_bad_options_are_one_line(args, option, capsys):
    from gpt2.serve import main

    try:
        code = main(["--init", "nowhere", *args])  # refused before anything is loaded
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and option in err and len(err.strip().splitlines()) == 1


def test_warning_beyond_loopback():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert exposure_warning(host, 8000, None) is None
    open_ = exposure_warning("0.0.0.0", 8000, None)
    assert "reachable from the network" in open_ and "no API key" in open_ and KEY_ENV in open_
    assert len(open_.splitlines()) == 1
    assert "an API key is required" in exposure_warning("192.168.1.5", 8000, "k")
    assert exposure_warning("myhost.lan", 8000, None)  # a name may resolve anywhere


@pytest.mark.parametrize("body, limit", [
    ({"prompt": "x" * (BLOCK * 32 + 1)}, f"at most {BLOCK * 32}"),  # characters, refused before tokenizing
    ({"prompt": "hello " * (BLOCK + 1)}, f"context of {BLOCK}"),
    ({"prompt": ["a"] * 17}, "at most 16"),
    ({"prompt": ["a", "b", "c"], "n": 6}, "at most 16"),
    ({"prompt": "a", "n": 17}, "<= 16"),
    ({"prompt": "a", "stop": ["w", "x", "y", "z", "v"]}, "up to 4"),
    ({"prompt": "a", "stop": "s" * 257}, "at most 256"),
    ({"prompt": "a", "max_tokens": CAP + 1}, f"<= {CAP}"),
    ({"prompt": [[1, 2]] * 17}, "at most 16"),
])
def test_caps_are_named(server, body, limit):
    assert limit in error_of(post(server, body), 400)["message"]


HOSTILE = [
    b'{"prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # nesting: RecursionError in json
    b'{"prompt": ' + b"[" * 500 + b"1" + b"]" * 500 + b"}",
    b'{"prompt": "hi", "seed": 1180591620717411303424}',  # 2**70
    b'{"prompt": "hi", "seed": 18446744073709551616}',  # 2**64
    b'{"prompt": "hi", "seed": -9223372036854775809}',
    b'{"prompt": [1180591620717411303424]}',
    b'{"prompt": "hi", "max_tokens": 1180591620717411303424}',
    b'{"prompt": "hi", "top_k": 1180591620717411303424}',
    b'{"prompt": "hi", "max_tokens": 1e400}',
    b'{"prompt": "hi", "temperature": NaN}',
    b'{"prompt": "hi", "temperature": Infinity}',
    b'{"prompt": "hi", "top_p": -Infinity}',
    b'{"prompt": "hi", "seed": ' + b"7" * 5000 + b"}",  # past Python's 4300-digit limit
    b'{"prompt": "hi", "max_tokens": true}', b'{"prompt": "hi", "temperature": false}',
    b'{"prompt": "hi", "n": true}', b'{"prompt": [true, false]}', b'{"prompt": "hi", "seed": true}',
    b'{"prompt": "hi", "echo": [1]}', b'{"prompt": "hi", "stream": 1}', b'{"prompt": "hi", "logprobs": 6}',
    b'\xff\xfe\x00garbage', b"null", b"[1, 2]", b"",
]


@pytest.mark.parametrize("raw", HOSTILE, ids=lambda raw: raw[:40].decode("latin-1"))
def test_hostile_values_get_400_not_500(server, raw):
    for stream in (False, True):  # refused before a stream starts, never a 200 that fails
        body = raw.replace(b'{"prompt"', b'{"stream": true, "prompt"', 1) if stream else raw
        r = httpx.post(f"{server}/v1/completions", content=body, headers={"Content-Type": "application/json"},
                       timeout=30)
        error_of(r, 400)


@pytest.mark.parametrize("temperature", [1e-30, 1e-300, 5e-324, 1e-6])
def test_tiny_temperature_is_greedy(server, temperature):
    greedy = post(server, {"prompt": "Hello", "max_tokens": 8, "temperature": 0}).json()["choices"][0]["text"]
    r = post(server, {"prompt": "Hello", "max_tokens": 8, "temperature": temperature, "seed": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy
    with httpx.stream("POST", f"{server}/v1/completions", timeout=30,
                      json={"prompt": "Hello", "max_tokens": 8, "temperature": temperature, "stream": True}) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: {")]
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events) == greedy


def test_catch_all_answers_in_openai_shape(guarded):
    r = httpx.get(guarded + "/boom", headers=AUTH)
    assert error_of(r, 500)["type"] == "server_error" and "ZeroDivisionError" in r.json()["error"]["message"]
    assert error_of(httpx.get(guarded + "/nowhere", headers=AUTH), 404)
    assert error_of(httpx.get(guarded + "/v1/completions", headers=AUTH), 405)


def test_smaller_vocabulary_refuses_ids_beyond_it(tmp_path, server):
    model, info = tiny_run(tmp_path, vocab_size=1000)
    with serving(create_app(model, info, max_tokens_cap=CAP)) as small:
        assert post(small, {"prompt": [999, 5], "max_tokens": 3}).status_code == 200
        for prompt in ([1000], [5, 50256], "Hello zebra"):  # "Hello" is token 15496
            for stream in (False, True):
                error = error_of(post(small, {"prompt": prompt, "max_tokens": 3, "stream": stream}), 400)
                assert "0..999" in error["message"] and error["param"] == "prompt"
    # a table padded to 50304 rows: the padding is no token
    assert "0..50256" in error_of(post(server, {"prompt": [50260]}), 400)["message"]
    assert post(server, {"prompt": [50256], "max_tokens": 2}).status_code == 200


def test_concurrency_bound_answers_429(slow):
    url, calls = slow
    with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                      json={"prompt": "Go on", "max_tokens": CAP, "stream": True}) as held:
        lines = held.iter_lines()  # kept: a dropped iterator closes the connection
        next(lines)
        r = post(url, {"prompt": "hi", "max_tokens": 2})
        assert "--max-concurrent" in error_of(r, 429)["message"] and r.headers["retry-after"] == "1"
    deadline = time.time() + 10
    while generating() and time.time() < deadline:
        time.sleep(0.05)
    assert post(url, {"prompt": "hi", "max_tokens": 2}).status_code == 200  # the slot came back


@pytest.mark.slow
def test_plain_request_stops_when_the_client_goes_away(slow):
    url, calls = slow
    settle(calls)
    calls.clear()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1 s and closes the connection
        httpx.post(f"{url}/v1/completions", json={"prompt": "Go on", "max_tokens": CAP}, timeout=1.0)
    ran = settle(calls)
    assert 0 < ran < CAP / 4, ran  # about 1 s of 2 ms tokens, and then no more
    time.sleep(0.3)
    assert len(calls) == ran and generating() == 0


@pytest.mark.slow
def test_page_asks_for_the_key_in_a_headless_browser(guarded):
    with headless_browser() as driver:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        driver.get(guarded + "/")
        def model_line(d):
            return d.find_element(By.ID, "model").text
        WebDriverWait(driver, 20).until(lambda d: "API key" in model_line(d))  # /info refused: the page says why
        key = driver.find_element(By.ID, "api_key")
        assert key.is_displayed()
        key.send_keys(KEY + "\t")  # the change event: /info again, with the key
        WebDriverWait(driver, 20).until(lambda d: "stage flash" in model_line(d))
        generate_in_page(driver)


@pytest.mark.slow
def test_page_script_parses(tmp_path):
    node = shutil.which("node")
    if not node:
        pytest.skip("node is not installed: the page's script is not syntax-checked here")
    html = page(64, key_required=True)
    (tmp_path / "page.js").write_text(html[html.index("<script>") + 8:html.index("</script>")])
    r = subprocess.run([node, "--check", str(tmp_path / "page.js")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
