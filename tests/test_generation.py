"""gpt2/model/generation.py: the KV cache gives the no-cache path's tokens, sampling controls, batches, stop strings,
and `python -m gpt2.sample`'s options and bad input. CPU, tiny random models, no network."""

import subprocess
import threading

import pytest
import torch

from gpt2.model.generation import EOT, KVCache, complete, prompt_vocab_size, sample_next, stream, stream_text
from gpt2.model.gpt import GPT, GPTConfig


def tiny(attention="flash", vocab_size=128, tokenizer_vocab_size=100, block_size=32, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32,
                         attention=attention, tokenizer_vocab_size=tokenizer_vocab_size)).eval()


def prompts(lengths=(3, 9, 1), vocab=100, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


SETTINGS = [dict(temperature=0), dict(), dict(top_k=10), dict(top_p=0.8), dict(temperature=0.7, top_k=20, top_p=0.9)]


@pytest.mark.parametrize("attention", ["manual", "flash"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
def test_cache_gives_the_no_cache_tokens(attention, settings):
    model = tiny(attention)
    idx = torch.tensor(prompts((6, 6, 6)))
    # 40 new tokens after 6: past the context of 32, so the sliding window is covered too
    cached = model.generate(idx, 40, generator=torch.Generator().manual_seed(5), **settings)
    plain = model.generate(idx, 40, generator=torch.Generator().manual_seed(5), use_cache=False, **settings)
    assert cached.shape == (3, 46) and torch.equal(cached[:, :6], idx)
    assert torch.equal(cached, plain)


def test_cache_logits_match_the_full_forward():
    for attention in ("manual", "flash"):
        model = tiny(attention)
        idx = torch.tensor(prompts((10, 10)))
        with torch.no_grad():
            full = model(idx)[0]
            cache = KVCache(model.config.n_layer, 2, 10, "cpu")
            cache.step(torch.ones(2, 4, dtype=torch.bool))
            steps = [model(idx[:, :4], cache=cache)[0]]
            for t in range(4, 10):
                cache.step(torch.ones(2, 1, dtype=torch.bool))
                steps.append(model(idx[:, t:t + 1], cache=cache)[0])
        torch.testing.assert_close(torch.cat(steps, 1), full[:, 3:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["manual", "flash"])
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("settings", [dict(temperature=0), dict(top_p=0.9)], ids=["greedy", "top_p"])
def test_prompts_of_different_lengths_equal_each_alone(attention, use_cache, settings):
    model = tiny(attention)
    ps = prompts((3, 11, 1))
    batch = torch.stack(list(stream(model, ps, 40, seed=7, use_cache=use_cache, **settings)), 1)
    for i, p in enumerate(ps):
        alone = torch.stack(list(stream(model, [p], 40, seed=7 + i, **settings)), 1)[0]
        assert torch.equal(batch[i], alone), i


def test_greedy_is_argmax_and_needs_no_randomness():
    model = tiny()
    idx = torch.tensor(prompts((5, 5)))
    out = model.generate(idx, 10, temperature=0)
    greedy = idx
    with torch.no_grad():
        for _ in range(10):
            greedy = torch.cat((greedy, model(greedy)[0][:, -1, :100].argmax(-1, keepdim=True)), 1)
    assert torch.equal(out, greedy)


def test_padded_ids_are_never_produced():
    model = tiny(vocab_size=128, tokenizer_vocab_size=100)
    with torch.no_grad():  # the padded rows of the table would win every draw without the guard
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[100:] = 10.0
    for settings in SETTINGS:
        out = torch.stack(list(stream(model, prompts((4, 2)), 20, seed=0, **settings)), 1)
        assert out.max() < 100, settings


def test_padded_table_defaults_to_gpt2_vocabulary():
    assert GPTConfig(vocab_size=50304).tokenizer_vocab_size == 50257
    assert GPTConfig(vocab_size=128).tokenizer_vocab_size == 128


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    def seen(**kw):
        return {sample_next(logits, generator=torch.Generator().manual_seed(s), **kw).item() for s in range(300)}
    assert seen(top_k=2) == {0, 1}
    assert seen(top_p=0.7) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert seen(top_p=0.5) == {0}
    assert seen(top_p=0.01) == {0}  # the likeliest token always stays
    assert seen(top_p=1.0) == {0, 1, 2, 3}
    assert seen(temperature=0) == {0}
    per_row = sample_next(logits.repeat(3, 1), generator=[torch.Generator().manual_seed(s) for s in range(3)])
    assert per_row.shape == (3, 1)


def fake_tokenizer():
    """ids -> characters: id i is chr(ord('a') + i % 26), EOT is '|'."""
    def decode(ids):
        return "".join("|" if i == EOT else chr(ord("a") + i % 26) for i in ids)
    def encode(text):
        return [ord(c) - ord("a") for c in text]
    return encode, decode


def test_stop_strings_end_the_text_and_are_not_shown():
    model = tiny()
    encode, decode = fake_tokenizer()
    full = complete(model, ["abc"], 30, temperature=0, encode=encode, decode=decode, stop_ids=())[0]
    assert full.finish_reason == "length" and len(full.text) == 30
    stop = full.text[10:13]
    cut = full.text.index(stop)
    streamed = list(stream_text(model, ["abc"], 30, temperature=0, stop=[stop], encode=encode, decode=decode,
                                stop_ids=()))
    text = "".join(piece for _, piece, _ in streamed)
    assert text == full.text[:cut] and streamed[-1][2] == "stop"
    assert sum(1 for *_, reason in streamed if reason) == 1


def test_stop_token_ends_a_row_but_not_the_others():
    model = tiny()
    encode, decode = fake_tokenizer()
    rows = complete(model, ["abc", "xyz"], 20, temperature=0, encode=encode, decode=decode, stop_ids=())
    first = rows[0].tokens[4]  # make row 0's fifth token a stop token
    stopped = complete(model, ["abc", "xyz"], 20, temperature=0, encode=encode, decode=decode, stop_ids=(first,))
    assert stopped[0].tokens == rows[0].tokens[:rows[0].tokens.index(first)]
    assert stopped[0].finish_reason == "stop"
    if first not in rows[1].tokens:
        assert stopped[1].tokens == rows[1].tokens and stopped[1].finish_reason == "length"


def count_forward_passes(model) -> list:
    """One entry per forward pass: the token embedding runs once in each, the model's own forward and the
    CPU's one-token decode step alike (which does not go through model.forward)."""
    calls = []
    model.transformer.wte.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_stream_stops_when_the_caller_stops():
    model = tiny()
    calls = count_forward_passes(model)
    steps = stream(model, prompts((3,)), 1000, seed=0)
    first = [next(steps) for _ in range(3)]
    assert len(first) == 3 and len(calls) == 3  # lazy: one pass per token taken
    steps.close()
    with pytest.raises(StopIteration):
        next(steps)
    assert len(calls) == 3
    texts = stream_text(model, [[1, 2, 3]], 1000, temperature=0, encode=list, decode=str, stop_ids=())
    next(texts)
    ran = len(calls)
    texts.close()  # closing the text stream closes the token stream under it
    assert len(calls) == ran


def test_cancel_stops_before_the_next_forward_pass():
    model = tiny()
    calls, cancel = count_forward_passes(model), threading.Event()
    steps = stream(model, prompts((3, 5)), 1000, seed=0, cancel=cancel)
    next(steps), next(steps)
    cancel.set()  # from another thread in the server: the same Event
    assert list(steps) == [] and len(calls) == 2


@pytest.mark.parametrize("temperature", [1e-6, 1e-30, 1e-300, 5e-324])
def test_tiny_temperatures_are_greedy(temperature):
    model = tiny()
    greedy = torch.stack(list(stream(model, prompts((4, 2)), 12, temperature=0)), 1)
    tiny_t = torch.stack(list(stream(model, prompts((4, 2)), 12, temperature=temperature, seed=1)), 1)
    assert torch.equal(greedy, tiny_t)
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert sample_next(logits, temperature).item() == 1  # no inf / NaN from logits / temperature


def test_any_integer_is_a_seed():
    model = tiny()
    wrapped = torch.stack(list(stream(model, prompts((3, 3)), 6, seed=2**64 - 1)), 1)  # rows: 2**64-1, 2**64 = 0
    assert torch.equal(wrapped[1], torch.stack(list(stream(model, prompts((3, 3))[1:], 6, seed=0)), 1)[0])
    negative = torch.stack(list(stream(model, prompts((3,)), 6, seed=-1)), 1)  # torch: -1 is 2**64 - 1
    assert torch.equal(negative, wrapped[:1])


def test_ids_beyond_the_vocabulary_are_refused():
    model = tiny(vocab_size=128, tokenizer_vocab_size=100)
    with pytest.raises(ValueError, match="token id 128"):
        next(stream(model, [[1, 128]], 3))
    with pytest.raises(ValueError, match="token id -1"):
        next(stream(model, torch.tensor([[1, -1]]), 3))
    assert prompt_vocab_size(model) == 100
    assert prompt_vocab_size(tiny(vocab_size=60000, tokenizer_vocab_size=60000)) == EOT + 1  # the tokenizer's


# ---- python -m gpt2.sample -------------------------------------------------------------------------------

def run_sample(*args):
    """python -m gpt2.sample, in this process (a subprocess costs seconds of imports): (returncode, stdout, stderr)."""
    import contextlib
    import io

    from gpt2.sample import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)).save_pretrained(folder)
    return folder


def test_sample_new_options(hf_folder):
    base = ["--init", str(hf_folder), "--num-samples", "2", "--max-new-tokens", "8"]
    r = run_sample(*base, "--prompt", "ROMEO:", "--prompt", "Once upon a time,", "--temperature", "0",
                   "--top-p", "0.9", "--top-k", "none")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith(">> ")]
    assert len(lines) == 4 and lines[0] == lines[1] and lines[2].startswith(">> Once upon a time,")
    cached = run_sample(*base, "--seed", "3")
    plain = run_sample(*base, "--seed", "3", "--no-cache")
    assert cached.returncode == plain.returncode == 0 and cached.stdout == plain.stdout


@pytest.mark.parametrize("args, option", [
    (["--top-k", "0"], "--top-k"), (["--num-samples", "0"], "--num-samples"), (["--prompt", ""], "--prompt"),
    (["--max-new-tokens", "-5"], "--max-new-tokens"), (["--top-p", "1.5"], "--top-p"),
    (["--temperature", "-1"], "--temperature"), (["--top-k", "many"], "--top-k"),
    (["--temperature", "inf"], "--temperature"), (["--temperature", "nan"], "--temperature"),
    (["--top-p", "nan"], "--top-p"), (["--top-p", "0"], "--top-p"), (["--top-k", "-3"], "--top-k"),
    (["--seed", str(2**70)], "--seed"), (["--seed", str(-2**64)], "--seed"), (["--seed", "1.5"], "--seed"),
])
def test_sample_refuses_bad_options(hf_folder, args, option):
    r = run_sample("--init", str(hf_folder), *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error:") and option in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_sample_refuses_what_is_not_a_gpt2(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert", "hidden_size": 32}')
    pickled = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, pickled)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    for init, words in ((bert, "bert"), (pickled, "holds more than tensors"), (text, "not a readable checkpoint")):
        r = run_sample("--init", str(init))
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith(f"error: --init {init}") and words in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert "weights_only=False" not in r.stderr and "pwned" not in r.stdout


def test_sample_extreme_values_behave(hf_folder):
    base = ["--init", str(hf_folder), "--num-samples", "2", "--max-new-tokens", "6"]
    greedy = run_sample(*base, "--temperature", "0")
    for t in ("1e-30", "1e-300", "5e-324"):  # greedy, not a division overflowing to NaN
        r = run_sample(*base, "--temperature", t)
        assert r.returncode == 0 and r.stdout == greedy.stdout, r.stderr
    assert run_sample(*base, "--seed", "-1").stdout == run_sample(*base, "--seed", str(2**64 - 1)).stdout  # as torch
    several = run_sample(*base, "--seed", str(2**64 - 1), "--prompt", "a", "--prompt", "b")  # seeds wrap past 2**64
    assert several.returncode == 0 and several.stdout.count(">> ") == 4, several.stderr
    assert run_sample(*base, "--top-k", str(10**30), "--top-p", "1e-300").returncode == 0


def test_sample_smaller_vocabulary(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=1000,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path)
    r = run_sample("--init", str(tmp_path), "--prompt", "Hello zebra")  # "Hello" is token 15496
    error = r.stderr.strip().splitlines()[-1]  # the lines before it: transformers' progress bar, if any
    assert r.returncode == 2 and error.startswith("error: --prompt") and "Traceback" not in r.stderr
    assert "token id 15496" in error and "vocabulary of 1000" in error
    ok = run_sample("--init", str(tmp_path), "--prompt", "a", "--num-samples", "2", "--max-new-tokens", "5")
    assert ok.returncode == 0 and ok.stdout.count(">> a") == 2, ok.stderr


def test_logprobs_are_the_raw_distribution_and_cost_nothing_when_off(monkeypatch):
    model, (encode, decode) = tiny(), fake_tokenizer()
    ps = prompts((3, 9))  # left-padded together
    rows = complete(model, ps, 6, temperature=0.8, top_k=30, seed=2, logprobs=4, encode=encode, decode=decode,
                    stop_ids=())
    for p, row in zip(ps, rows):
        with torch.no_grad():
            logits, _ = model(torch.tensor([p + row.tokens]))  # alone, no cache, no padding
        expected = torch.log_softmax(logits[0, :, :100], dim=-1)  # the tokenizer's 100 ids, not the table's 128
        assert [e.token for e in row.logprobs] == row.tokens and row.completion_tokens == 6
        for j, e in enumerate(row.logprobs):
            at = expected[len(p) - 1 + j]  # before temperature and top-k
            assert e.logprob == pytest.approx(at[e.token].item(), abs=1e-5)
            assert [t for t, _ in e.top] == at.topk(4).indices.tolist() and e.offset == len(p) + j
    pieces = list(stream_text(model, ps, 3, echo=True, logprobs=0, seed=2, encode=encode, decode=decode,
                              stop_ids=()))
    assert pieces[:2] == [(0, decode(ps[0]), None), (1, decode(ps[1]), None)]  # echo: the prompts come first
    monkeypatch.setattr("gpt2.model.generation.step_logprobs", lambda *a: pytest.fail("logprobs computed when off"))
    off = complete(model, ps, 6, temperature=0.8, top_k=30, seed=2, encode=encode, decode=decode, stop_ids=())
    assert [r.tokens for r in off] == [r.tokens for r in rows] and off[0].logprobs is None


def test_echo_logprobs_score_the_prompt():
    model, (encode, decode) = tiny(), fake_tokenizer()
    p = prompts((5,))[0]
    row = complete(model, [p], 2, temperature=0, echo=True, logprobs=1, encode=encode, decode=decode,
                   stop_ids=())[0]
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([p]))[0][0, :, :100], dim=-1)
    assert [e.token for e in row.logprobs] == p + row.tokens and row.logprobs[0].logprob is None
    assert [e.logprob for e in row.logprobs[1:5]] == pytest.approx([expected[j - 1, p[j]].item() for j in range(1, 5)],
                                                                   abs=1e-5)
    assert [e.offset for e in row.logprobs] == list(range(7))
