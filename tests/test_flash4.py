"""model.attention=flash4 (gpt2/model/flash4.py, the flash4 stage): the model hands FlashAttention-4 q, k, v in its
(B, T, heads, head size) layout and gets the same layout back; generation keeps SDPA; the check before a run
refuses, in one line, what the kernels cannot run. On a CPU the kernel is stood in for by SDPA in that layout;
the real kernel against SDPA is the cuda test at the end."""

import copy

import pytest
import torch
import torch.nn.functional as F

from gpt2.distributed import ranks_from_env
from gpt2.errors import UsageError
from gpt2.model import flash4
from gpt2.model.generation import complete
from gpt2.model.gpt import GPT, GPTConfig
from gpt2.training.checks import check_config
from helpers import compose_with, fake_gpu


def sdpa_in_flash4_layout(calls):
    """A stand-in with flash_attn.cute.flash_attn_func's contract: (B, T, H, D) in, (out, lse) out."""
    def flash_attn_func(q, k, v, causal=False):
        calls.append((tuple(q.shape), causal))
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=causal)
        return out.transpose(1, 2), None
    return flash_attn_func


@pytest.fixture
def kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(flash4, "_flash_attn_func", lambda: sdpa_in_flash4_layout(calls))
    return calls


def twins():
    torch.manual_seed(0)
    flash = GPT(GPTConfig.from_preset("tiny", attention="flash"))
    other = GPT(GPTConfig.from_preset("tiny", attention="flash4"))
    other.load_state_dict(copy.deepcopy(flash.state_dict()))
    return flash, other


def test_flash4_gets_the_heads_layout_and_matches_sdpa_in_loss_and_gradients(kernel):
    flash, ours = twins()
    idx = torch.randint(0, 50257, (3, 40))
    losses = []
    for model in (flash, ours):
        _, loss = model(idx, idx)
        loss.backward()
        losses.append(loss.item())
    assert kernel == [((3, 40, 2, 32), True)] * 2  # once per layer, causal, (B, T, heads, head size)
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)
    for (name, p), q in zip(flash.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_generation_with_a_kv_cache_keeps_sdpa(monkeypatch):
    def no_kernel():
        raise AssertionError("the KV-cache path must not call FlashAttention-4")
    monkeypatch.setattr(flash4, "_flash_attn_func", no_kernel)
    flash, ours = twins()
    prompts = [[464, 3290, 318], [15496, 11, 314, 1101, 257]]  # two lengths: left padding and its mask
    for model in (flash, ours):
        model.eval()
    ours_out, flash_out = (complete(m, prompts, max_new_tokens=6, top_k=1) for m in (ours, flash))
    assert [c.tokens for c in ours_out] == [c.tokens for c in flash_out] and len(ours_out[1].tokens) == 6


def test_the_stage_is_big_batch_with_flash4_attention():
    stage, previous = compose_with(["+stage=flash4"]), compose_with(["+stage=big-batch"])
    assert stage.model.attention == "flash4" and stage.stage.name == "flash4"
    assert {k: v for k, v in stage.model.items() if k != "attention"} == \
        {k: v for k, v in previous.model.items() if k != "attention"}
    assert stage.train == previous.train and stage.optim == previous.optim


def refusal(cfg) -> str:
    with pytest.raises(UsageError) as e:
        check_config(cfg, ranks_from_env())
    assert "\n" not in str(e.value) and "model.attention=flash (SDPA)" in str(e.value)
    return str(e.value)


def test_a_cpu_run_is_refused_in_one_line():
    assert "run on NVIDIA GPUs only, and this run is on cpu" in refusal(
        compose_with(["+stage=flash4", "train.device=cpu"]))


def test_a_gpu_before_hopper_is_refused(monkeypatch):
    fake_gpu(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    assert "A100-SXM4-80GB has compute capability 8.0" in refusal(compose_with(["+stage=flash4", "train.device=cuda"]))


def test_without_the_package_or_bf16_or_a_head_size_of_8s_it_is_refused(monkeypatch):
    fake_gpu(monkeypatch, (9, 0), "NVIDIA H200")
    monkeypatch.setattr(flash4, "import_problem", lambda: "No module named 'cutlass'")
    assert "flash_attn.cute does not import (No module named 'cutlass'): pip install --pre flash-attn-4" in refusal(
        compose_with(["+stage=flash4", "train.device=cuda"]))
    monkeypatch.setattr(flash4, "import_problem", lambda: None)
    check_config(compose_with(["+stage=flash4", "train.device=cuda"]), ranks_from_env())  # Hopper + package: ok
    fake_gpu(monkeypatch, (10, 0), "NVIDIA B200")
    check_config(compose_with(["+stage=flash4", "train.device=cuda"]), ranks_from_env())  # Blackwell: ok
    assert "train.autocast_dtype is fp32" in refusal(
        compose_with(["+stage=flash4", "train.device=cuda", "train.autocast_dtype=fp32"]))
    assert "head size n_embd/n_head = 36 is not a multiple of 8" in refusal(
        compose_with(["+stage=flash4", "train.device=cuda", "model.n_embd=432"]))


def test_a_missing_or_broken_package_is_a_reason_not_a_crash(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)  # import flash_attn.cute raises ImportError
    assert "flash_attn.cute" in flash4.import_problem()
    broken = tmp_path / "flash_attn" / "cute"
    broken.mkdir(parents=True)
    (tmp_path / "flash_attn" / "__init__.py").write_text("")
    (broken / "__init__.py").write_text("raise OSError('libcuda.so.1: cannot open shared object file')\n")
    monkeypatch.delitem(sys.modules, "flash_attn.cute")
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert flash4.import_problem() == "libcuda.so.1: cannot open shared object file"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device: these run on a GPU machine (python -m gpt2.bench)")
def test_the_real_kernel_matches_sdpa_on_this_gpu():
    device = torch.device("cuda")
    reason = flash4.unsupported_reason(device, "bf16", 64)
    if reason:
        pytest.skip(f"FlashAttention-4 cannot run here: {reason}")
    torch.manual_seed(0)
    B, T, H, D = 4, 1024, 12, 64
    qkv = torch.randn(B, T, 3 * H * D, device=device, dtype=torch.bfloat16, requires_grad=True)
    # strided views of one (B, T, 3C) projection, as CausalSelfAttention hands them over (no copies)
    q, k, v = (t.view(B, T, H, D) for t in qkv.split(H * D, dim=2))
    out = flash4.causal_attention(q, k, v)
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)
    grad = torch.randn_like(out)
    (got,), (want,) = torch.autograd.grad(out, (qkv,), grad), torch.autograd.grad(ref, (qkv,), grad)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    for name, g, w in zip("qkv", got.split(H * D, dim=2), want.split(H * D, dim=2)):
        torch.testing.assert_close(g, w, atol=5e-2, rtol=5e-2, msg=f"d{name}")
