"""On a real CUDA GPU: what the CPU suite cannot check. Marked `cuda`; skipped, with the reason, without a GPU.

Run on a GPU machine with `python -m pytest -q tests/test_cuda.py -ra` (or `-m cuda`). The whole file is
sized for about 90 s on one H100: a GPT-2 124M forward/backward at B=16, T=1024 costs 0.1-0.4 s, but
torch.compile of the full 124M model costs 30-60 s, so no test compiles the 12-layer model. Only 2-layer
models of GPT-2's width (n_embd 768, vocab 50257, T=1024) are compiled: one with fullgraph=True (compiled
vs eager), and the same graph again inside train() (validation must not recompile); the second mostly
hits inductor's graph cache. Every train() run is 2-4 steps with one validation batch.

Every body takes its device from the `cuda` fixture and every tolerance says why it is what it is.
"""

import contextlib
import copy
import gc
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2.training import metrics
from gpt2.training.devices import enable_sdpa_backends, enabled_sdpa_backends, set_sdpa_backends
from gpt2.data.batches import load_tokens
from gpt2.model.gpt import GPT, GPTConfig
from gpt2.training.optim import build_optimizer, describe_optimizer, lr_at, set_lr
from helpers import compose_with, records, run_train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.slow,  # about 90 s on an H100 (see above): compiles and trains
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="no CUDA device: these run on a GPU machine (python -m gpt2.bench)"),
]

DEVICE = "cuda"
PRESET = "gpt2"  # GPT-2 124M: 12 layers, 12 heads, width 768, context 1024
B, T = 16, 1024  # the speed-up study's micro-batch
ATTN_SHAPE = (16, 12, 1024, 64)  # (B, heads, T, head size) of GPT-2 124M at B=16
SEED = 1337
KNOWN_GPUS = ("H100", "H200", "A100")  # datasheet peaks the MFU column must use (metrics.DATASHEET_TFLOPS)


# ---- shared set-up ----------------------------------------------------------------------------------

@contextlib.contextmanager
def restored_torch_flags():
    """Whatever a test or a train() run sets globally (matmul precision, TF32) is put back afterwards."""
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, enabled_sdpa_backends())
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
        enable_sdpa_backends(before[2])


@pytest.fixture(scope="module")
def cuda():
    return torch.device(DEVICE)


@pytest.fixture(autouse=True)
def fp32_highest(cuda):
    """Each test starts in true fp32 (precision 'highest', as the baseline stage), with a fixed seed and
    no memory left cached by the test before; the global precision is restored afterwards."""
    with restored_torch_flags():
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        torch.manual_seed(SEED)
        yield
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    """One token cache for the module: the fixture below and every train() run share it."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tokens(shakespeare_path, data_cache):
    """Tiny Shakespeare as GPT-2 tokens (int64, CPU), through gpt2.data.batches and gpt2.tokenizer."""
    data_cfg = compose_with([f"data.path={shakespeare_path}", f"data.cache_dir={data_cache}"]).data
    ids = load_tokens(data_cfg)
    assert len(ids) == 338_025  # the documented token count: the right text and tokenizer
    return torch.from_numpy(ids.astype(np.int64))


@pytest.fixture(scope="module")
def run(shakespeare_path, data_cache):
    """train() in-process on the GPU, composed like `python run.py model=gpt2 train.device=cuda ...`;
    run(tmp_path, *overrides, name=...) -> (summary, run_dir). Global torch flags are restored after."""
    def run(tmp_path, *overrides, name="run"):
        with restored_torch_flags():
            return run_train(tmp_path, shakespeare_path, f"model={PRESET}", f"train.device={DEVICE}",
                             f"data.cache_dir={data_cache}", "train.timing_skip=1", *overrides, name=name)
    return run


def batch(tokens, b, t=T, offset=0):
    """(x, y), each (b, t) int64 on the CPU: consecutive text and the token after each position."""
    chunk = tokens[offset: offset + b * t + 1]
    return chunk[:-1].view(b, t), chunk[1:].view(b, t)


def loss_and_grads(model, x, y, bf16=False):
    """One forward/backward under the precision now in force: (loss, {name: gradient copy})."""
    model.zero_grad(set_to_none=True)
    named = getattr(model, "_orig_mod", model).named_parameters()  # a compiled model's names, unprefixed
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        _, loss = model(x, y)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in named}


def cosine(a, b):
    """Cosine similarity in float64 (a float32 sum over 10^8 elements is not accurate enough)."""
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


def overall_cosine(grads_a, grads_b):
    dot = sum((grads_a[n].double() * grads_b[n].double()).sum() for n in grads_a)
    norm_a = math.sqrt(sum(grads_a[n].double().square().sum() for n in grads_a))
    norm_b = math.sqrt(sum(grads_b[n].double().square().sum() for n in grads_b))
    return (dot / (norm_a * norm_b)).item()


def relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


# ---- the model on the GPU -------------------------------------------------------------------------

def test_step0_loss_is_uniform_and_the_gpu_forward_equals_the_cpu_forward(cuda, tokens):
    torch.manual_seed(SEED)
    cpu_model = GPT(GPTConfig.from_preset(PRESET))  # 124M, manual attention, vocab 50257
    gpu_model = copy.deepcopy(cpu_model).to(cuda)
    x, y = batch(tokens, B)
    with torch.no_grad():
        _, loss = gpu_model(x.to(cuda), y.to(cuda))
    # fresh N(0, 0.02) weights predict nearly uniformly over 50257 tokens: ln(50257) = 10.825 (about 10.9-11.0
    # is usual); 0.3 nats leaves room for that and catches a broken init, scale or loss (e.g. 0 or 20)
    assert abs(loss.item() - math.log(50257)) < 0.3, loss.item()

    xs, ys = x[:2], y[:2]  # B=2 keeps the CPU side to about a second
    with torch.no_grad():
        logits_cpu, loss_cpu = cpu_model(xs, ys)
        logits_gpu, loss_gpu = gpu_model(xs.to(cuda), ys.to(cuda))
    # both true fp32 (precision 'highest': no TF32): only summation order differs, ~1e-6 relative after 12
    # layers; logits are O(1), so 1e-4 is ~100x that, and any real difference (masking, ops) is O(0.1)
    torch.testing.assert_close(logits_gpu.cpu(), logits_cpu, rtol=1e-4, atol=1e-4)
    # the mean over 2048 tokens of ~11 nats: fp32 rounding gives ~1e-6 relative
    assert loss_gpu.item() == pytest.approx(loss_cpu.item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["tf32", "bf16"])
def test_tf32_and_bf16_stay_close_to_fp32(cuda, tokens, mode):
    torch.manual_seed(SEED)
    model = GPT(GPTConfig.from_preset(PRESET)).to(cuda)
    x, y = (t.to(cuda) for t in batch(tokens, 8))  # B=8: the fp32 manual-attention pass stays near 25 GiB
    torch.set_float32_matmul_precision("highest")
    loss32, grads32 = loss_and_grads(model, x, y)
    if mode == "tf32":
        torch.set_float32_matmul_precision("high")  # restored by the fp32_highest fixture
        assert torch.backends.cuda.matmul.allow_tf32
        loss, grads = loss_and_grads(model, x, y)
    else:
        loss, grads = loss_and_grads(model, x, y, bf16=True)
    # TF32 keeps 10 mantissa bits, bf16 7 (relative rounding 5e-4 and 4e-3 per value); summed over
    # thousands of terms that averages out: measured differences are ~1e-5 (bf16, CPU) and less for TF32,
    # so these bounds are ~100x looser than the expected difference and far below a real bug's (~1e-1)
    max_loss_diff, min_cos, min_cos_overall = {"tf32": (5e-4, 0.999, 0.9999), "bf16": (2e-3, 0.99, 0.999)}[mode]
    assert abs(loss - loss32) / loss32 < max_loss_diff, (loss, loss32)
    per_param = {n: cosine(grads[n], grads32[n]) for n in grads32}
    worst = min(per_param, key=per_param.get)
    assert per_param[worst] > min_cos, f"{worst}: cosine {per_param[worst]:.6f} vs fp32"
    assert overall_cosine(grads, grads32) > min_cos_overall


# ---- attention ------------------------------------------------------------------------------------

def test_manual_and_flash_attention_agree(cuda, tokens):
    torch.manual_seed(SEED)
    flash = GPT(GPTConfig.from_preset(PRESET, attention="flash")).to(cuda)
    manual = GPT(GPTConfig.from_preset(PRESET, attention="manual")).to(cuda)
    manual.load_state_dict(flash.state_dict())  # the causal mask is a non-persistent buffer: same keys
    x, y = (t.to(cuda) for t in batch(tokens, 4))
    with torch.no_grad():
        logits_flash, _ = flash(x)
        logits_manual, _ = manual(x)
    loss_flash, grads_flash = loss_and_grads(flash, x, y)
    loss_manual, grads_manual = loss_and_grads(manual, x, y)
    # fp32 both ways (SDPA runs its fp32 kernel: memory-efficient or math); only the order of the softmax
    # sums differs (online vs two-pass), ~1e-6 relative; a wrong mask or scale moves logits by O(0.1)
    torch.testing.assert_close(logits_flash, logits_manual, rtol=1e-4, atol=1e-4)
    assert loss_flash == pytest.approx(loss_manual, rel=1e-5)
    # gradients: the same rounding through backward, ~1e-5 relative; 1e-3 leaves a 100x margin
    errors = {n: relative_error(grads_flash[n], grads_manual[n]) for n in grads_manual}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-3, f"{worst}: relative error {errors[worst]:.2e}"


def test_flash_or_cudnn_kernel_runs_for_gpt2_shapes(cuda):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device=cuda).manual_seed(SEED)
    q, k, v, grad_out = (torch.randn(ATTN_SHAPE, device=cuda, dtype=torch.bfloat16, generator=gen)
                         for _ in range(4))
    # the reference: the math backend in fp32 on the same (bf16-valued) inputs
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True)
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), grad_out.float())

    outcome = {}
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            outcome[name] = "not in this torch"
            continue
        qb, kb, vb = (t.clone().requires_grad_() for t in (q, k, v))
        try:
            with sdpa_kernel([backend]):  # only this backend: SDPA raises if it cannot run these inputs
                out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)
            grads = torch.autograd.grad(out, (qb, kb, vb), grad_out)
            metrics.synchronize(cuda)  # kernel errors surface here, inside the try
        except RuntimeError as e:
            outcome[name] = f"unavailable: {str(e).strip().splitlines()[0][:200]}"
            continue
        # bf16 output: 8 bits of mantissa (relative rounding 4e-3) on values of O(1), P rounded to bf16
        # before P @ V; 2e-2 is a few roundings, while a wrong mask or scale is off by O(1)
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2, msg=lambda m: f"{name}: {m}")
        for which, got, want in zip("qkv", grads, ref_grads):
            # gradients in bf16 through a softmax backward: directions agree to ~1e-4; 0.999 catches errors
            assert cosine(got, want) > 0.999, f"{name}: d{which} cosine {cosine(got, want):.5f}"
        outcome[name] = "ok"
    assert "ok" in outcome.values(), f"no fused attention kernel ran for {ATTN_SHAPE} bf16: {outcome}"


def test_sdpa_backend_cudnn_runs_cudnn_attention_and_the_next_job_gets_every_kernel_back(cuda, run, tmp_path):
    from torch.profiler import ProfilerActivity, profile

    q, k, v = (torch.randn(ATTN_SHAPE, device=cuda, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with restored_torch_flags():
        set_sdpa_backends("cudnn")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
            metrics.synchronize(cuda)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_cudnn_attention" in ops, sorted(o for o in ops if "attention" in o)
    # two jobs of one process, as in a multirun: cuDNN asked for, then torch's own choice (eager, 1 micro-step)
    small = ("+stage=big-batch", "train.compile=false", "train.batch_size=8", "train.total_batch_size=8192",
             "train.steps=2", "train.val_batches=1", "train.save_checkpoints=false")
    cudnn, cudnn_dir = run(tmp_path, *small, "train.sdpa_backend=cudnn", name="cudnn")
    flash, flash_dir = run(tmp_path, *small, name="flash")
    assert cudnn["effective"]["sdpa_backends"] == ["cudnn", "math"]
    assert flash["effective"]["sdpa_backends"] == ["flash", "efficient", "cudnn", "math"]
    # the same function in another kernel: bf16 step-0 losses agree to rounding (~1e-3 of ~10.9)
    assert records(cudnn_dir)[0]["loss"] == pytest.approx(records(flash_dir)[0]["loss"], rel=1e-3)


# ---- torch.compile ----------------------------------------------------------------------------------

def test_compiled_model_equals_eager_and_never_recompiles(cuda, tokens):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(SEED)
    # 2 layers of GPT-2 124M's width, T=1024: the compile takes ~15 s instead of ~60 s for 12 layers
    eager = GPT(GPTConfig.from_preset(PRESET, n_layer=2)).to(cuda)
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)  # fullgraph: a graph break is an error
    x, y = (t.to(cuda) for t in batch(tokens, 4))
    graphs_before = counters["stats"]["unique_graphs"]
    loss_c, grads_c = loss_and_grads(compiled, x, y)
    loss_e, grads_e = loss_and_grads(eager, x, y)
    assert counters["stats"]["unique_graphs"] - graphs_before == 1  # one graph for the whole forward
    # fp32 ('highest'): inductor fuses LayerNorm, softmax, GELU and the loss into Triton kernels whose
    # reductions run in another order; ~1e-6 relative, so 1e-5 (loss) and 1e-3 (gradients) are 10-100x that
    assert loss_c == pytest.approx(loss_e, rel=1e-5)
    errors = {n: relative_error(grads_c[n], grads_e[n]) for n in grads_e}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-3, f"{worst}: relative error {errors[worst]:.2e}"

    # further micro-steps (new batches, same shapes) reuse the graph: any recompile raises here
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(1, 4):
            xi, yi = (t.to(cuda) for t in batch(tokens, 4, offset=i * 4 * T))
            loss_i, _ = loss_and_grads(compiled, xi, yi)
            assert math.isfinite(loss_i)
    assert counters["stats"]["unique_graphs"] - graphs_before == 1
    torch._dynamo.reset()


def test_validation_causes_no_recompile(tmp_path, run, monkeypatch):
    """train.compile=true with validation after every step: the compiled training graph is made on step 0
    and nothing after it (steps 1-2, three validations in eval mode without grad) may compile again."""
    from torch._dynamo.utils import counters

    graphs = {"before": counters["stats"]["unique_graphs"]}
    log_step = metrics.StepLog.step

    def step(self, record, world_size):
        log_step(self, record, world_size)
        if record["step"] == 0:  # step 0's forward is compiled; its first validation comes next
            graphs["after_step_0"] = counters["stats"]["unique_graphs"]
            torch._dynamo.config.error_on_recompile = True  # undone by monkeypatch below

    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", False)
    monkeypatch.setattr(metrics.StepLog, "step", step)
    # the same 2-layer, 124M-width model and shapes as the compile test above: inductor's cache serves it
    try:
        summary, run_dir = run(tmp_path, "model.n_layer=2", "train.batch_size=4", "train.compile=true",
                               "train.steps=3", "train.val_every=1")
    except torch._dynamo.exc.RecompileError as e:
        pytest.fail(f"a recompile after step 0 (validation must run the uncompiled module): {e}")
    assert summary["status"] == "ok" and summary["effective"]["compiled"] is True
    assert [r["step"] for r in records(run_dir, "val_loss")] == [0, 1, 2]  # validated after every step
    needed = graphs["after_step_0"] - graphs["before"]
    assert needed >= 1, "train.compile=true compiled nothing"
    assert counters["stats"]["unique_graphs"] - graphs["before"] == needed, \
        "validation compiled graphs of its own: evaluate() should run the uncompiled module"


# ---- optimizer --------------------------------------------------------------------------------------

def test_fused_adamw_equals_foreach_adamw(cuda):
    torch.manual_seed(SEED)
    model = GPT(GPTConfig.from_preset(PRESET, n_layer=2)).to(cuda)
    twin = copy.deepcopy(model)
    gpt3 = compose_with(["+stage=gpt3-optim"]).optim  # betas (0.9, 0.95), decay 0.1 on 2-D, cosine, fused
    fused = build_optimizer(model, gpt3, cuda)
    assert describe_optimizer(fused)["fused"] is True, "the gpt3-optim stage must get fused AdamW on CUDA"
    foreach = build_optimizer(twin, compose_with(["+stage=gpt3-optim", "optim.fused=false"]).optim, cuda)
    for group in foreach.param_groups:
        group["foreach"] = True
    gen = torch.Generator(device=cuda).manual_seed(SEED)
    for step in range(5):
        for optimizer in (fused, foreach):
            set_lr(optimizer, lr_at(step, gpt3, 5))
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, device=cuda, generator=gen) * 1e-2
            q.grad = p.grad.clone()
        fused.step()
        foreach.step()
    # same arithmetic in one kernel vs a few: a few ulps of the update (~1e-4 * 1e-7) on weights of ~0.02,
    # far below 1e-6 relative; a wrong bias correction, decay or eps moves weights by ~1e-4
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8, msg=lambda m: f"{name}: {m}")
        # the moments: the fused kernel updates them with fused multiply-adds (lerp), the foreach path in two
        # rounded steps, so an element that sums to nearly zero can differ by ~1e-9 absolute (seen on an H100:
        # 1.1e-9 on exp_avg values of order 1e-3) and by any amount relative: compare against the tensor's scale
        for key in ("exp_avg", "exp_avg_sq"):
            ref = foreach.state[q][key]
            torch.testing.assert_close(fused.state[p][key], ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item(),
                                       msg=lambda m: f"{name} {key}: {m}")


# ---- what a run records: peak FLOP/s, memory ------------------------------------------------------

def known_gpu(device) -> bool:
    return any(fragment in torch.cuda.get_device_name(device) for fragment in KNOWN_GPUS)


def test_mfu_uses_the_datasheet_peak_of_this_gpu(cuda):
    name = torch.cuda.get_device_name(cuda)
    if not known_gpu(cuda):
        pytest.skip(f"{name!r} is none of {', '.join(KNOWN_GPUS)}: its peak may rightly be measured")
    peak_bf16, source = metrics.peak_tflops(cuda, "bf16")
    assert source == "datasheet", f"{name!r}: the MFU peak was {source}, not read from the datasheet table"
    assert 300 <= peak_bf16 <= 1000  # dense bf16: A100 312, H100 PCIe 756.5, H100/H200 SXM 989.4
    peak_tf32, _ = metrics.peak_tflops(cuda, "tf32")
    assert peak_tf32 == pytest.approx(peak_bf16 / 2, rel=0.01)  # dense TF32 is half of dense bf16 on these


@pytest.fixture(scope="module")
def flash_run(tmp_path_factory, run):
    """The flash stage as the sweep runs it (GPT-2 124M, B=16, T=1024), for 2 steps and 1 validation batch."""
    gc.collect()
    torch.cuda.empty_cache()
    return run(tmp_path_factory.mktemp("flash"), "+stage=flash", "train.steps=2")


def test_flash_stage_fits_24_gib_reserved(flash_run):
    summary, _ = flash_run
    assert summary["status"] == "ok"
    assert (summary["batch_size"], summary["seq_len"], summary["effective"]["attention"]) == (B, T, "flash")
    # the design's goal: a 24 GiB consumer card runs the flash stage; reserved is what the allocator holds
    assert summary["peak_mem_reserved_gib"] < 24, f"{summary['peak_mem_reserved_gib']:.2f} GiB reserved"


def test_a_run_records_peak_memory_and_the_datasheet_peak(flash_run, cuda):
    summary, _ = flash_run
    assert summary["device"] == torch.cuda.get_device_name(cuda)
    assert summary["peak_mem_gib"] > 0.5  # 124M weights, AdamW moments and gradients alone are ~2 GiB
    assert summary["peak_mem_reserved_gib"] >= summary["peak_mem_gib"]  # the allocator holds what it hands out
    total = torch.cuda.get_device_properties(cuda).total_memory / 2**30
    assert summary["device_mem_gib"] == pytest.approx(total, rel=1e-3)
    assert summary["peak_mem_reserved_gib"] <= summary["device_mem_gib"]
    if known_gpu(cuda):
        assert summary["mfu_peak_source"] == "datasheet"
        assert summary["mfu_peak_tflops"] == metrics.peak_tflops(cuda, "bf16")[0]  # the flash stage is bf16
        assert 0 < summary["mfu"] < 1


# ---- checkpoints ----------------------------------------------------------------------------------

# gpt3-optim on CUDA: fused AdamW moments, cosine LR after a 2-step warm-up, clipping, bf16, flash attention
RESUMABLE = ["+stage=gpt3-optim", "model.n_layer=2", "train.batch_size=4", "train.steps=4",
             "optim.warmup_steps=2", "train.checkpoint_every=2"]


def test_a_cuda_checkpoint_resumes_to_the_same_losses(tmp_path, run, monkeypatch):
    full, full_dir = run(tmp_path, *RESUMABLE, name="full")
    assert full["status"] == "ok"

    log_step = metrics.StepLog.step

    def lost_at_step_2(self, record, world_size):  # a preemption: no chance to save after step 1's checkpoint
        if record["step"] == 2:
            raise RuntimeError("node lost")
        log_step(self, record, world_size)

    monkeypatch.setattr(metrics.StepLog, "step", lost_at_step_2)
    with pytest.raises(RuntimeError, match="node lost"):
        run(tmp_path, *RESUMABLE, name="lost")
    monkeypatch.undo()
    resumed, resumed_dir = run(tmp_path, *RESUMABLE, f"train.resume={tmp_path / 'lost'}", name="resumed")
    assert resumed["status"] == "ok" and resumed["start_step"] == 2
    want = [r["loss"] for r in records(full_dir)][2:]
    got = [r["loss"] for r in records(resumed_dir)]
    assert [r["step"] for r in records(resumed_dir)] == [2, 3]
    # the checkpoint restores weights and AdamW moments bit for bit, but flash attention's backward adds dQ
    # with atomics, so the order of fp32 additions (not the values) may differ run to run: ~1e-7 relative.
    # A resume bug (another batch, lost moments, wrong LR) moves these losses by 1e-4 or more
    assert got == pytest.approx(want, rel=1e-5)


def test_fp8_head_runs_torch_scaled_mm_and_stays_close_to_the_bf16_fused_head(cuda):
    """The fp8-head stage's kernels (torch._scaled_mm, cuBLASLt) on this GPU: they accept the operand layouts
    FP8LinearCrossEntropy makes, and loss and gradients stay within the CPU suite's tolerances of the bf16
    fused head (tests/test_fp8_head.py: loss 5e-3 relative, gradients 0.1 relative Frobenius norm)."""
    from gpt2.model.fp8 import fp8_unsupported_reason
    from gpt2.model.fused_loss import fused_linear_cross_entropy

    reason = fp8_unsupported_reason(cuda)
    if reason:
        pytest.skip(reason)
    n, c, vocab = 4 * 1024 + 5, 768, 50304  # an N that is not a multiple of 16: the head pads it
    x = torch.randn(n, c, device=cuda) * 2
    w = torch.randn(vocab, c, device=cuda) * 0.02
    y = torch.randint(0, 50257, (n,), device=cuda)

    def head(fp8):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fused_linear_cross_entropy(xi, wi, y, fp8=fp8)
        loss.backward()
        return loss.detach(), xi.grad, wi.grad

    want, got = head(False), head(True)
    assert got[0] == pytest.approx(want[0].item(), rel=5e-3)
    assert relative_error(got[1], want[1]) < 0.1 and relative_error(got[2], want[2]) < 0.1
    assert not torch.equal(got[2], want[2])  # the FP8 kernels ran, not the bf16 ones
