"""gpt2/model/fused_loss.py and the fused-loss stage: the fused, chunked classifier + cross-entropy against the
textbook F.cross_entropy(F.linear(x, W).float(), y), alone and inside the tied GPT, eager and compiled.

Tolerances (CPU):
- fp32: loss to 1e-6 relative, gradients to 1e-5 relative + 1e-7 absolute (the same arithmetic, summed
  in another order: per chunk instead of in one matmul).
- bf16 autocast: the reference runs under the same autocast (lm_head's matmul in bf16, the loss in fp32).
  Loss and grad_x to 1e-4 relative (the same bf16 products), grad_W to 2e-2 relative of its largest entry:
  the reference rounds the whole (V, C) product to bf16 once, the fused function sums bf16 chunk products
  in fp32, so they differ by a bf16 rounding (2^-8) of the entries.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

import gpt2.runs.job  # noqa: F401  registers the config schema
from helpers import REPO
from gpt2.model.fused_loss import CHUNK_ELEMENTS, chunk_rows_for, fused_linear_cross_entropy
from gpt2.model.gpt import GPT, GPTConfig

N, C = 50, 16  # rows, width


def inputs(vocab, n=N, seed=0, ignored=(0, 7, 31)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, generator=g)
    w = torch.randn(vocab, C, generator=g) * 0.5
    y = torch.randint(0, vocab, (n,), generator=g)
    y[list(ignored)] = -100  # counted for nothing, as by F.cross_entropy
    return x, w, y


def loss_and_grads(fn, x, w, y, scale=1.0):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(x, w, y)
    (loss * scale).backward()
    return loss.detach(), x.grad, w.grad


def reference(x, w, y):
    return F.cross_entropy(F.linear(x, w).float(), y)


# ---- the function alone ------------------------------------------------------------------------

@pytest.mark.parametrize("vocab", [101, 128])  # 128: a padded vocabulary (targets stay below 101)
@pytest.mark.parametrize("chunk_rows", [1, 7, N, N + 13])  # 7 does not divide 50; N, N+13: one chunk
def test_fp32_loss_and_gradients_equal_cross_entropy(vocab, chunk_rows):
    x, w, y = inputs(vocab)
    y = torch.where(y >= 101, y - 101, y)
    got = loss_and_grads(lambda *a: fused_linear_cross_entropy(*a, chunk_rows=chunk_rows), x, w, y, scale=0.25)
    want = loss_and_grads(reference, x, w, y, scale=0.25)  # grad_output != 1: backward scales
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    for g, r in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    if vocab == 128:
        assert got[2][101:].abs().sum() > 0  # padded rows are pushed down by the softmax


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_matmul_in_bf16_loss_in_fp32(x_dtype):
    x, w, y = inputs(128)
    x = x.to(x_dtype)

    def under_autocast(fn):
        def run(*a):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*a)
        return run

    got = loss_and_grads(under_autocast(lambda *a: fused_linear_cross_entropy(*a, chunk_rows=7)), x, w, y)
    want = loss_and_grads(under_autocast(reference), x, w, y)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == x_dtype and got[2].dtype == torch.float32  # the dtypes of x and of the master W
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6 if x_dtype == torch.float32 else 1e-3)
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=2e-2 * want[2].abs().max().item())
    # and the matmul really ran in bf16: the fp32 loss differs by more than fp32 rounding
    fp32 = fused_linear_cross_entropy(x.float(), w, y)
    assert (fp32 - got[0]).abs() > 1e-6


def test_extreme_logits_stay_finite():
    x, w, y = inputs(101)
    loss, gx, gw = loss_and_grads(lambda *a: fused_linear_cross_entropy(*a, chunk_rows=7), x * 300, w, y)
    want = loss_and_grads(reference, x * 300, w, y)
    assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gw).all()
    torch.testing.assert_close(loss, want[0], rtol=1e-5, atol=0)


def test_nothing_of_logits_size_is_kept_for_backward():
    x, w, y = inputs(101, n=64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        fused_linear_cross_entropy(x.requires_grad_(), w.requires_grad_(), y, chunk_rows=8)
    assert saved and all(shape.numel() <= w.numel() for shape in saved)  # grad_x (N, C), grad_W (V, C)


def test_a_second_backward_through_the_same_graph_is_refused():
    x, w, y = inputs(101)
    loss = fused_linear_cross_entropy(x.requires_grad_(), w.requires_grad_(), y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):  # the saved gradients were scaled in place
        loss.backward()


@pytest.mark.parametrize("autocast", [False, True])
def test_without_gradients_the_same_loss_and_no_gradient_is_made(monkeypatch, autocast):
    """Under torch.no_grad (validation) the loss alone: equal to the training path's and to cross_entropy, and
    the Function that makes grad_x and grad_W in its forward is not called."""
    import gpt2.model.fused_loss as fused_loss

    x, w, y = inputs(101)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    with ctx():
        trained = fused_linear_cross_entropy(x.clone().requires_grad_(), w.clone().requires_grad_(), y, chunk_rows=7)
        want = reference(x, w, y)

    def made_gradients(*args):
        raise AssertionError("FusedLinearCrossEntropy (gradients in the forward pass) ran without grad")
    monkeypatch.setattr(fused_loss.FusedLinearCrossEntropy, "apply", made_gradients)
    with torch.no_grad(), ctx():
        got = fused_linear_cross_entropy(x.requires_grad_(), w, y, chunk_rows=7)
    assert got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got, trained.detach(), rtol=1e-6 if not autocast else 1e-4, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-6 if not autocast else 1e-4, atol=0)
    y_all_ignored = torch.full_like(y, -100)
    with torch.no_grad():
        assert torch.isnan(fused_linear_cross_entropy(x, w, y_all_ignored))  # as F.cross_entropy gives


def test_default_chunk_bounds_the_logits():
    for vocab in (50257, 50304, 101, 10**9):
        rows = chunk_rows_for(vocab)
        assert rows >= 1 and (rows * vocab <= CHUNK_ELEMENTS or rows == 1)
    assert chunk_rows_for(50304) % 64 == 0
    assert chunk_rows_for(50304) * 50304 * 2 <= 300e6  # under 300 MB of bf16 logits per chunk


# ---- inside the tied GPT -------------------------------------------------------------------------

def tiny_pair(**overrides):
    """The same tiny GPT twice (padded vocabulary 128, tokenizer 100): loss="plain" and loss="fused"."""
    sizes = dict(block_size=32, vocab_size=128, tokenizer_vocab_size=100, n_layer=2, n_head=2, n_embd=32,
                 attention="flash")
    sizes.update(overrides)
    torch.manual_seed(0)
    plain = GPT(GPTConfig(loss="plain", **sizes))
    fused = GPT(GPTConfig(loss="fused", **sizes))
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def batch(B=3, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx, targets = torch.randint(0, 100, (B, T), generator=g), torch.randint(0, 100, (B, T), generator=g)
    targets[0, :3] = -100
    return idx, targets


def assert_same_grads(a, b, rtol=1e-5, atol=1e-7):
    grads_b = dict(b.named_parameters())
    for name, p in a.named_parameters():
        torch.testing.assert_close(p.grad, grads_b[name].grad, rtol=rtol, atol=atol, msg=name)


def test_training_steps_of_fused_equal_plain():
    plain, fused = tiny_pair()
    assert fused.transformer.wte.weight is fused.lm_head.weight
    # SGD: the update is linear in the gradient (Adam would blow up the rounding noise of the gradients
    # that are zero in exact arithmetic, such as the key biases')
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, fused)]
    for step in range(2):
        idx, targets = batch(seed=step)
        losses = []
        for model in (plain, fused):
            for micro in range(2):  # two micro-steps: gradients accumulate, backward scales by 1/2
                logits, loss = model(idx[micro::2], targets[micro::2])
                (loss / 2).backward()
            losses.append(loss.detach())
        assert logits is None  # fused: no logits with targets
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
        assert_same_grads(plain, fused)
        grad = fused.lm_head.weight.grad  # the tied matrix: head and embedding gradients summed, dense
        assert grad.layout == torch.strided and grad[idx.unique()].abs().sum() > 0
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_model_under_bf16_autocast_matches_plain():
    plain, fused = tiny_pair()
    idx, targets = batch()
    losses = []
    for model in (plain, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, targets)
        loss.backward()
        losses.append(loss)
    assert losses[1].dtype == torch.float32
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=0)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=3e-2 * scale, msg=name)


def test_without_targets_fused_gives_full_logits_and_generates():
    plain, fused = tiny_pair()
    idx, _ = batch()
    logits, loss = fused(idx)
    assert loss is None and logits.shape == (3, 16, 128)
    torch.testing.assert_close(logits, plain(idx)[0])
    out = fused.generate(idx[:, :4], max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 9) and out.max() < 100


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.slow
def test_compiled_fullgraph_equals_eager(bf16):
    _, fused = tiny_pair()
    idx, targets = batch()
    compiled = torch.compile(fused, fullgraph=True)  # fullgraph: any graph break is an error
    grads, losses = [], []
    for model in (compiled, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(idx, targets)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in fused.named_parameters()})
        fused.zero_grad(set_to_none=True)
    assert losses[0].dtype == torch.float32
    # fp32: the same arithmetic; bf16: the compiler fuses the bf16 elementwise ops of the blocks itself
    # (fewer roundings to bf16), so the two differ by bf16 roundings
    rtol, atol = (1e-6, 1e-7) if not bf16 else (2e-3, 0)
    torch.testing.assert_close(losses[0], losses[1], rtol=rtol, atol=0)
    for name, g in grads[1].items():
        tol = 1e-7 if not bf16 else 3e-2 * g.abs().max().item()
        torch.testing.assert_close(grads[0][name], g, rtol=1e-5 if not bf16 else 0, atol=tol, msg=name)


# ---- the stage -----------------------------------------------------------------------------------

def compose_stage(stage):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[f"+stage={stage}"])


def test_fused_loss_stage_composes_on_top_of_compile():
    stage, previous = compose_stage("fused-loss"), compose_stage("compile")
    assert stage.stage.name == "fused-loss"
    assert gpt2.config.option_str(stage.model.loss) == "fused"
    assert gpt2.config.option_str(previous.model.loss) == "plain"  # no earlier stage fuses the loss
    assert stage.train.compile is True
    # everything else is the compile stage's (which carries all the stages before it)
    for key in ("train", "optim", "data"):
        assert stage[key] == previous[key], key
    assert {k: v for k, v in stage.model.items() if k != "loss"} == \
        {k: v for k, v in previous.model.items() if k != "loss"}
