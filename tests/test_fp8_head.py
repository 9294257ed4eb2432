"""gpt2/model/fp8.py, FP8LinearCrossEntropy (gpt2/model/fused_loss.py) and the fp8-head stage: the classifier's three
matmuls in FP8 against the exact fp32 fused head, the GPU kernels' operand rules, 50 training steps against
the bf16 stage, the stage's config, and the refusal on a device without FP8.

Tolerances (CPU; the FP8 matmuls are emulated exactly there, see gpt2/model/fp8.py fp8_mm):
- loss to 5e-3 relative: the logits come from e4m3 operands (3 mantissa bits: each entry rounded by up to
  2^-4 = 6 % relative), errors that largely cancel in the log-sum-exp; observed 1e-3 to 2.4e-3.
- grad_x and grad_W to 0.1 in relative Frobenius norm: their products take the gradient in e5m2 (2 mantissa
  bits: up to 12.5 % per entry, about 4 % RMS) times an e4m3 operand; observed 0.05 to 0.07 (bf16: 0.004).
- 50 training steps: final loss within 0.02 nats of the bf16 stage's (observed 0.004, against the 1 nat
  the loss falls in those steps).
"""

import subprocess
import sys

import pytest
import torch

from gpt2.model import fp8
from gpt2.training.checks import check_config
from gpt2.distributed import ranks_from_env
from gpt2.errors import UsageError
from gpt2.model.fused_loss import fused_linear_cross_entropy
from gpt2.model.gpt import GPT, GPTConfig
from helpers import REPO, compose_with, records, run_train
from helpers import fake_gpu as gpu


def inputs(n=50, c=64, vocab=256, seed=0, x_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(n, c, generator=g) * x_scale, torch.randn(vocab, c, generator=g) * 0.5
    y = torch.randint(0, vocab, (n,), generator=g)
    y[[0, 7, 31]] = -100
    return x, w, y


def loss_and_grads(x, w, y, **kwargs):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_linear_cross_entropy(x, w, y, chunk_rows=7, **kwargs)  # 7 rows: rounded up to 16 for FP8
    (loss * 0.5).backward()  # grad_output != 1: backward scales
    return loss.detach(), x.grad, w.grad


def relative_error(got, want):
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("x_scale", [1.0, 1e-4])  # 1e-4: below e4m3's smallest number without dynamic scales
def test_fp8_head_is_close_to_the_exact_fused_head(bf16, x_scale):
    x, w, y = inputs(x_scale=x_scale)  # 50 rows: padded to 64 inside
    want = loss_and_grads(x, w, y)  # fp32, exact to rounding (tests/test_fused_loss.py)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        got = loss_and_grads(x, w, y, fp8=True)
    assert got[1].shape == x.shape and got[1].dtype == x.dtype and got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=5e-3, atol=0)
    assert relative_error(got[1], want[1]) < 0.1 and relative_error(got[2], want[2]) < 0.1
    assert not torch.equal(got[2], want[2])  # FP8 really ran (the same numbers would mean bf16/fp32 matmuls)


def test_fp8_matmuls_meet_the_gpu_kernels_rules(monkeypatch):
    import gpt2.model.fused_loss

    calls = []

    def checked_mm(a8, a_inv, b8, b_inv, out_dtype, fast_accum=False):
        (_, k), (k2, n) = a8.shape, b8.shape
        assert k == k2 and k % 16 == 0 and n % 16 == 0, (a8.shape, b8.shape)
        assert a8.stride(1) == 1 and b8.stride(0) == 1, "a row-major, b column-major"
        assert {a8.dtype, b8.dtype} <= {fp8.E4M3, fp8.E5M2} and (a8.dtype, b8.dtype) != (fp8.E5M2, fp8.E5M2)
        assert a_inv.dtype == b_inv.dtype == torch.float32 and a_inv.numel() == b_inv.numel() == 1
        calls.append((a8.dtype, b8.dtype, fast_accum))
        return fp8.fp8_mm(a8, a_inv, b8, b_inv, out_dtype, fast_accum)

    monkeypatch.setattr(gpt2.model.fused_loss, "fp8_mm", checked_mm)
    loss_and_grads(*inputs(n=50), fp8=True)  # 50 rows, chunks of 7 requested
    assert len(calls) == 3 * 4  # 64 padded rows in chunks of 16: logits, grad_x, grad_W per chunk
    assert calls[:3] == [(fp8.E4M3, fp8.E4M3, True), (fp8.E5M2, fp8.E4M3, False), (fp8.E5M2, fp8.E4M3, False)]


@pytest.mark.parametrize("a_dtype", [fp8.E4M3, fp8.E5M2])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_cpu_fp8_mm_equals_torch_scaled_mm(a_dtype, out_dtype):
    g = torch.Generator().manual_seed(0)
    a8, a_inv = fp8.to_fp8(torch.randn(16, 32, generator=g), a_dtype)
    b8, b_inv = fp8.to_fp8(torch.randn(48, 32, generator=g) * 3)
    got = fp8.fp8_mm(a8, a_inv, fp8.column_major(b8.t()), b_inv, out_dtype)
    want = torch._scaled_mm(a8, b8.t(), scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype)
    assert got.dtype == out_dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-5 if out_dtype == torch.float32 else 8e-3,
                               atol=1e-5)


@pytest.mark.slow
def test_compiled_fullgraph_equals_eager():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=128, tokenizer_vocab_size=100, n_layer=1, n_head=2, n_embd=32,
                          attention="flash", loss="fused_fp8"))
    g = torch.Generator().manual_seed(0)
    idx, targets = torch.randint(0, 100, (2, 16), generator=g), torch.randint(0, 100, (2, 16), generator=g)
    results = []
    for run in (torch.compile(model, fullgraph=True), model):  # fullgraph: any graph break is an error
        loss = run(idx, targets)[1]
        loss.backward()
        results.append((loss.detach(), model.lm_head.weight.grad.clone()))
        model.zero_grad(set_to_none=True)
    # the same FP8 numbers up to the compiler's fp32 summation order (which may move an entry by one FP8 step)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=0)
    assert relative_error(results[0][1], results[1][1]) < 1e-2


@pytest.mark.slow
def test_50_steps_stay_within_tolerance_of_the_bf16_stage(tmp_path, shakespeare_path):
    # the stages' settings (bf16, flash, vocab 50304, GPT-3 optimizer, fused loss) at a CPU size, eager
    # (the compiled path is the test above); big-batch is fp8-head without FP8
    small = ["train.compile=false", "train.batch_size=2", "train.seq_len=32", "train.total_batch_size=64",
             "train.steps=50", "train.val_every=0", "train.save_checkpoints=false"]
    finals = {}
    for stage in ("big-batch", "fp8-head"):
        summary, run_dir = run_train(tmp_path, shakespeare_path, f"+stage={stage}", *small, name=stage)
        losses = [r["loss"] for r in records(run_dir)]
        assert summary["status"] == "ok" and len(losses) == 50
        assert losses[0] - summary["final_loss"] > 0.8, "the runs must learn for the comparison to mean anything"
        finals[stage] = summary["final_loss"]
        assert summary["effective"]["loss"] == ("fused_fp8" if stage == "fp8-head" else "fused")
    assert abs(finals["fp8-head"] - finals["big-batch"]) < 0.02, finals


@pytest.mark.slow
def test_stage_composes_on_top_of_big_batch():
    out = subprocess.run([sys.executable, str(REPO / "run.py"), "+stage=fp8-head", "--cfg", "job"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "name: fp8-head" in out.stdout and "loss: fused_fp8" in out.stdout
    stage, previous = compose_with(["+stage=fp8-head"]), compose_with(["+stage=big-batch"])
    for key in ("train", "optim", "data"):
        assert stage[key] == previous[key], key
    assert {k: v for k, v in stage.model.items() if k != "loss"} == \
        {k: v for k, v in previous.model.items() if k != "loss"}


def test_a_gpu_without_fp8_is_refused_in_one_line(monkeypatch):
    cfg = compose_with(["+stage=fp8-head", "train.device=cuda"])
    gpu(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    with pytest.raises(UsageError, match=r"model.loss=fused_fp8 \(stage fp8-head\).*A100.*8\.0") as e:
        check_config(cfg, ranks_from_env())
    assert "\n" not in str(e.value) and "model.loss=fused" in str(e.value)
    gpu(monkeypatch, (9, 0), "NVIDIA H200")
    check_config(cfg, ranks_from_env())  # Hopper passes
    check_config(compose_with(["+stage=fp8-head", "train.device=cpu"]), ranks_from_env())


def test_sizes_the_fp8_matmuls_cannot_take_are_refused():
    with pytest.raises(UsageError, match="model.vocab_size to be a multiple of 16.*not 50257.*50304"):
        check_config(compose_with(["+stage=fp8-head", "model.vocab_size=50257", "train.device=cpu"]), ranks_from_env())
    with pytest.raises(UsageError, match="model.n_embd to be a multiple of 16.*not 40"):
        check_config(compose_with(["+stage=fp8-head", "model=tiny", "model.n_embd=40", "train.device=cpu"]),
                     ranks_from_env())
