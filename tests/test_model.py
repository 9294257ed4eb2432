"""gpt2/model/gpt.py: initialisation, attention paths, presets, Hugging Face weights, sampling, the loss, training.

All on CPU with tiny models; Hugging Face checkpoints are small random GPT2LMHeadModels in a tmp folder.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2.model.gpt import GPT, GPTConfig, PRESETS


def tiny_config(**overrides):
    sizes = dict(block_size=32, vocab_size=128, n_layer=2, n_head=2, n_embd=32, attention="flash")
    sizes.update(overrides)
    return GPTConfig(**sizes)


def random_batch(vocab, B=3, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)


# ---- structure and initialisation ------------------------------------------------------------------

def test_token_table_is_tied_to_lm_head():
    model = GPT(tiny_config())
    assert model.transformer.wte.weight is model.lm_head.weight
    counted_twice = sum(p.numel() for p in model.state_dict().values())
    assert model.num_params(non_embedding=False) == counted_twice - model.lm_head.weight.numel()
    idx, targets = random_batch(128)
    model(idx, targets)[1].backward()
    grad = model.lm_head.weight.grad
    assert grad is not None and grad.layout == torch.strided  # the sum of both uses, dense
    assert grad[idx.unique()].abs().sum() > 0


def test_gpt2_initialisation_statistics():
    torch.manual_seed(0)
    n_layer = 4
    model = GPT(GPTConfig(block_size=256, vocab_size=2000, n_layer=n_layer, n_head=4, n_embd=256))
    residual_std = 0.02 / math.sqrt(2 * n_layer)
    for name, p in model.named_parameters():
        if name.endswith("bias"):  # linear and LayerNorm biases
            assert torch.all(p == 0), name
        elif ".ln_" in name or name.startswith("transformer.ln_f"):
            assert torch.all(p == 1), name  # LayerNorm gain
        else:
            expected = residual_std if name.endswith("c_proj.weight") else 0.02
            assert p.std().item() == pytest.approx(expected, rel=0.05), name
            assert abs(p.mean().item()) < expected / 10, name
    # the two residual projections per block really are scaled down, the other linears are not
    block = model.transformer.h[0]
    assert block.attn.c_proj.weight.std() < 0.5 * block.attn.c_attn.weight.std()
    assert block.mlp.c_proj.weight.std() < 0.5 * block.mlp.c_fc.weight.std()


def test_manual_and_flash_attention_agree():
    torch.manual_seed(0)
    flash = GPT(tiny_config(attention="flash"))
    with torch.no_grad():  # sharp attention patterns, so a wrong scale or mask would show
        for block in flash.transformer.h:
            block.attn.c_attn.weight.normal_(0.0, 0.5)
    manual = GPT(tiny_config(attention="manual"))
    manual.load_state_dict(flash.state_dict())
    idx, targets = random_batch(128, T=32)
    logits_f, loss_f = flash(idx, targets)
    logits_m, loss_m = manual(idx, targets)
    torch.testing.assert_close(logits_m, logits_f, atol=1e-5, rtol=1e-5)
    loss_f.backward()
    loss_m.backward()
    g_f = flash.transformer.h[0].attn.c_attn.weight.grad
    torch.testing.assert_close(manual.transformer.h[0].attn.c_attn.weight.grad, g_f, atol=1e-6, rtol=1e-4)
    # causal: the first position's output cannot depend on later tokens
    changed = idx.clone()
    changed[:, 1:] = (changed[:, 1:] + 1) % 128
    for model in (flash, manual):
        with torch.no_grad():
            torch.testing.assert_close(model(changed)[0][:, 0], model(idx)[0][:, 0])


def test_config_validation_and_context_limit():
    with pytest.raises(ValueError, match="attention"):
        tiny_config(attention="fast")
    with pytest.raises(ValueError, match="divisible"):
        tiny_config(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="unknown model preset"):
        GPTConfig.from_preset("gpt5")
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 33, dtype=torch.long))


# ---- presets ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, dims, n_params", [
    ("gpt2", (12, 12, 768), 124_439_808),
    ("gpt2-medium", (24, 16, 1024), 354_823_168),
    ("gpt2-large", (36, 20, 1280), 774_030_080),
    ("gpt2-xl", (48, 25, 1600), 1_557_611_200),
])
def test_presets_sizes(name, dims, n_params):
    cfg = GPTConfig.from_preset(name)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (*dims, 1024) == PRESETS[name]
    assert cfg.vocab_size == cfg.tokenizer_vocab_size == 50257
    with torch.device("meta"):  # shapes only: no memory, no time
        model = GPT(cfg)
    assert model.num_params(non_embedding=False) == n_params  # Hugging Face's count, the tied matrix once
    n_layer, _, n_embd = dims
    non_embedding = n_params - 1024 * n_embd  # the position table is left out of N
    assert model.num_params() == non_embedding
    assert model.flops_per_token(1024) == 6 * non_embedding + 12 * n_layer * n_embd * 1024


def test_gpt2_flops_per_token_matches_design_figure():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("gpt2", vocab_size=50304))
    assert model.flops_per_token(1024) / 1e6 == pytest.approx(855, rel=0.01)  # DESIGN.md: ~855 MFLOP


def test_tiny_preset_is_small():
    cfg = GPTConfig.from_preset("tiny", attention="flash")
    assert cfg.attention == "flash" and cfg.vocab_size == 50257
    model = GPT(cfg)
    assert 3e6 < model.num_params(non_embedding=False) < 4e6


# ---- Hugging Face weights ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-zero biases and LayerNorm parameters, so a mapping mistake shows
        for name, p in hf.named_parameters():
            if "bias" in name or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(folder)
    return folder


def hf_logits(folder, idx):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return hf(input_ids=idx).logits


@pytest.mark.parametrize("attention", ["flash", "manual"])
def test_from_pretrained_matches_transformers(hf_folder, attention):
    model = GPT.from_pretrained(str(hf_folder), attention=attention).eval()
    assert model.config.vocab_size == model.config.tokenizer_vocab_size == 100
    assert model.transformer.wte.weight is model.lm_head.weight
    idx, _ = random_batch(100, T=32)
    with torch.no_grad():
        logits, _ = model(idx)
    torch.testing.assert_close(logits, hf_logits(hf_folder, idx), atol=1e-5, rtol=0)


def test_save_hf_loads_in_transformers_with_same_logits(tmp_path):
    torch.manual_seed(1)
    model = GPT(tiny_config(vocab_size=100)).eval()
    model.save_hf(tmp_path)
    idx, _ = random_batch(100, T=32)
    with torch.no_grad():
        logits, _ = model(idx)
    torch.testing.assert_close(hf_logits(tmp_path, idx), logits, atol=1e-5, rtol=0)
    # and back again
    again = GPT.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(idx)[0], logits, atol=1e-6, rtol=0)


def test_padded_vocabulary_keeps_logits_and_bounds_loss(hf_folder, tmp_path):
    model = GPT.from_pretrained(str(hf_folder), vocab_size=128).eval()
    assert model.config.vocab_size == 128 and model.config.tokenizer_vocab_size == 100
    idx, targets = random_batch(100, T=32)
    reference = hf_logits(hf_folder, idx)
    with torch.no_grad():
        logits, loss = model(idx, targets)
    assert logits.shape == (3, 32, 128)
    torch.testing.assert_close(logits[..., :100], reference, atol=1e-5, rtol=0)
    hf_loss = F.cross_entropy(reference.view(-1, 100), targets.view(-1))
    # documented in from_pretrained: padded rows are the mean row, so they take at most pad/vocab of the mass
    assert 0 < loss.item() - hf_loss.item() <= math.log(1 + 28 / 100)
    # save_hf drops the padding again: transformers sees the 100 real ids with the same logits
    model.save_hf(tmp_path)
    torch.testing.assert_close(hf_logits(tmp_path, idx), reference, atol=1e-5, rtol=0)


# ---- the loss --------------------------------------------------------------------------------------

# (the fused, chunked loss of loss="fused" is tested against this one in tests/test_fused_loss.py)

@pytest.mark.parametrize("attention", ["flash", "manual"])
def test_loss_is_cross_entropy_of_the_logits_with_padded_vocab(attention):
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=128, tokenizer_vocab_size=100, attention=attention))
    idx, targets = random_batch(100)
    targets[0, :3] = -100  # ignored positions count for nothing
    logits, loss = model(idx, targets)
    assert loss.dtype == torch.float32
    reference = F.cross_entropy(logits.view(-1, 128), targets.view(-1))
    torch.testing.assert_close(loss, reference)
    loss.backward()
    grad = model.transformer.wte.weight.grad
    assert grad.layout == torch.strided
    assert grad[100:].abs().sum() > 0  # padded rows of the tied table still get the softmax's share


def test_gradients_accumulate_over_micro_steps():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx, targets = random_batch(128)
    (model(idx, targets)[1] / 2).backward()
    (model(idx, targets)[1] / 2).backward()
    accumulated = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model(idx, targets)[1].backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(accumulated[name], p.grad, atol=1e-7, rtol=1e-5, msg=name)


def test_untied_token_table_gets_a_dense_gradient():
    model = GPT(tiny_config())
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untie
    idx, targets = random_batch(128)
    model(idx, targets)[1].backward()
    assert model.transformer.wte.weight.grad.layout == torch.strided
    torch.optim.AdamW(model.parameters()).step()  # would raise on a sparse gradient


def test_bf16_autocast_loss_is_fp32():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx, targets = random_batch(128)
    _, loss32 = model(idx, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, targets)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.float().view(-1, 128), targets.view(-1)))
    assert abs(loss.item() - loss32.item()) < 0.05
    loss.backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("loss_kind", ["plain", "fused"])
def test_compiles_without_graph_breaks(loss_kind):
    torch._dynamo.reset()
    model = GPT(tiny_config(loss=loss_kind))
    idx, targets = random_batch(128)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: any graph break raises
    _, loss = compiled(idx, targets)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    _, eager_loss = model(idx, targets)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-7, rtol=1e-5, msg=name)
    torch._dynamo.reset()


# ---- sampling --------------------------------------------------------------------------------------

def test_generate_shape_and_reproducibility():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx, _ = random_batch(128, B=2, T=5)
    out = model.generate(idx, max_new_tokens=40, generator=torch.Generator().manual_seed(3))
    assert out.shape == (2, 45) and out.dtype == torch.long
    assert torch.equal(out[:, :5], idx)
    again = model.generate(idx, max_new_tokens=40, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    other = model.generate(idx, max_new_tokens=40, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(out, other)
    # longer than the context: the window slides
    assert model.generate(idx, max_new_tokens=40).shape == (2, 45)


def test_generate_never_emits_padded_ids():
    model = GPT(tiny_config(vocab_size=128, tokenizer_vocab_size=100)).eval()
    with torch.no_grad():  # every position's final features = ones; padded rows of the table score 10 each
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[100:] = 10.0
    idx, _ = random_batch(100, B=4, T=4)
    with torch.no_grad():
        assert torch.all(model(idx)[0].argmax(-1) >= 100)  # without the guard padded ids would win
    for top_k in (None, 1, 50):
        out = model.generate(idx, max_new_tokens=20, top_k=top_k, generator=torch.Generator().manual_seed(0))
        assert out[:, 4:].max() < 100


def test_top_k_1_is_greedy():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx, _ = random_batch(128, B=2, T=3)
    out = model.generate(idx, max_new_tokens=10, top_k=1, temperature=5.0,
                         generator=torch.Generator().manual_seed(0))
    greedy = idx
    with torch.no_grad():
        for _ in range(10):
            next_id = model(greedy)[0][:, -1].argmax(-1, keepdim=True)
            greedy = torch.cat((greedy, next_id), dim=1)
    assert torch.equal(out, greedy)


# ---- training ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_preset_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", attention="flash"))
    idx, targets = random_batch(50257, B=2, T=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        _, loss = model(idx, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if loss.item() < 0.2:
            break
    assert losses[0] > math.log(50257) - 1  # starts near uniform
    assert losses[-1] < 0.5, losses[-10:]


def test_from_pretrained_refuses_what_is_not_gpt2(tmp_path, hf_folder):
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(bert)
    with pytest.raises(ValueError, match=f"{bert} holds a bert model, not GPT-2"):
        GPT.from_pretrained(str(bert))
    # a GPT-2 folder whose weights lack a block: would otherwise be filled with random numbers
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((hf_folder / "config.json").read_text())
    weights = load_file(hf_folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".h.0.mlp." not in k}, broken / "model.safetensors")
    with pytest.raises(ValueError, match="is not a complete GPT-2 checkpoint .missing: .'transformer.h.0.mlp"):
        GPT.from_pretrained(str(broken))
