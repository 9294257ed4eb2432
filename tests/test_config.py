"""Composing the configs: stages accumulate, command-line overrides win, typos and bad types are refused."""

import shutil

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigKeyError, ValidationError

import gpt2.runs.job
from gpt2.bench import sweep_stage_names as sweep_stages
from gpt2.benchmark.candidates import builds_on  # the stages a sweep config runs, in its order
from helpers import CONF, REPO, STAGES, compose_with


def parent_stage(name: str):
    """The stage a stage file builds on (the first entry of its defaults list), or None for the baseline."""
    return builds_on(CONF, name)


# what each stage adds, as (key, value) pairs; a stage must also carry everything before it
ADDS = {
    "baseline": [("train.matmul_precision", "highest"), ("train.autocast_dtype", "fp32"),
                 ("model.attention", "manual"), ("model.vocab_size", None), ("optim.name", "adamw"),
                 ("optim.lr", 3e-4), ("optim.betas", [0.9, 0.999]), ("optim.schedule", "constant"),
                 ("optim.grad_clip", None), ("optim.fused", False), ("train.batch_size", 16),
                 ("train.seq_len", None), ("train.total_batch_size", None), ("train.compile", False),
                 ("train.sdpa_backend", "auto")],
    "tf32": [("train.matmul_precision", "high")],
    "bf16": [("train.autocast_dtype", "bf16")],
    "flash": [("model.attention", "flash")],
    "nice-vocab": [("model.vocab_size", 50304)],
    "gpt3-optim": [("optim.betas", [0.9, 0.95]), ("optim.eps", 1e-8), ("optim.weight_decay", 0.1),
                   ("optim.decay_2d_only", True), ("optim.fused", True), ("optim.schedule", "cosine"),
                   ("optim.lr", 6e-4), ("optim.min_lr_ratio", 0.1), ("optim.grad_clip", 1.0)],
    "grad-accum": [("train.total_batch_size", 524288)],
    "compile": [("train.compile", True)],
    "fused-loss": [("model.loss", "fused")],
    "big-batch": [("train.batch_size", 64)],
}


def lookup(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    value = getattr(node, "value", node)  # enums compare by their string
    return list(value) if hasattr(value, "__len__") and not isinstance(value, str) else value


def expected_settings(stage):
    settings = {}
    for name in STAGES[: STAGES.index(stage) + 1]:
        settings.update(dict(ADDS[name]))
    return settings


def test_the_full_sweep_is_the_chain_of_stages():
    # each stage builds on the one before it in the full sweep, back to the baseline
    assert STAGES[0] == "baseline" and parent_stage("baseline") is None
    for previous, stage in zip(STAGES, STAGES[1:]):
        assert parent_stage(stage) == previous, f"{stage} should build on {previous}"
    assert sweep_stages("speedup") == STAGES[:STAGES.index("grad-accum") + 1]  # the seed's seven
    assert sweep_stages("speedup_compile") == STAGES[:STAGES.index("compile") + 1]


def test_every_stage_file_reaches_the_baseline():
    # a user's own stage (README, "Add your own stage") need not be in a sweep, but must compose: its chain
    # ends at the baseline, names only existing stages, and has no cycle
    for path in sorted((CONF / "stage").glob("*.yaml")):
        chain, stage = [], path.stem
        while stage is not None:
            assert stage not in chain, f"cycle in the stage chain: {chain + [stage]}"
            assert (CONF / "stage" / f"{stage}.yaml").is_file(), f"{chain[-1]} builds on a missing stage {stage}"
            chain.append(stage)
            stage = parent_stage(stage)
        assert chain[-1] == "baseline"
        assert compose_with([f"+stage={path.stem}"]).stage.name == path.stem


def test_adding_a_stage_file_is_enough(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "stage" / "my-trick.yaml").write_text("# @package _global_\ndefaults:\n  - flash\n  - _self_\n\n"
                                                  "stage:\n  name: my-trick\n  adds: B=8\ntrain:\n  batch_size: 8\n")
    cfg = compose_with(["+stage=my-trick"], config_dir=conf)
    assert cfg.stage.name == "my-trick" and cfg.train.batch_size == 8 and lookup(cfg, "model.attention") == "flash"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_carries_every_earlier_stage(stage):
    cfg = compose_with([f"+stage={stage}"])
    assert cfg.stage.name == stage
    for key, expected in expected_settings(stage).items():
        assert lookup(cfg, key) == expected, f"{stage}: {key}"


def test_no_stage_is_the_baseline():
    bare, baseline = compose_with([]), compose_with(["+stage=baseline"])
    assert bare == baseline


def test_command_line_beats_the_stage():
    cfg = compose_with(["+stage=flash", "model.attention=manual", "train.batch_size=4"])
    assert lookup(cfg, "model.attention") == "manual"
    assert cfg.train.batch_size == 4
    assert lookup(cfg, "train.autocast_dtype") == "bf16"  # the rest of the stage stays


def test_model_presets_compose():
    for name in ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny"]:
        assert compose_with([f"model={name}"]).model.name == name


def test_typo_in_a_command_line_key_is_refused():
    with pytest.raises(ConfigCompositionException, match="bath_size"):
        compose_with(["+stage=flash", "train.bath_size=4"])


def test_typo_in_a_yaml_key_is_refused(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "stage" / "typo.yaml").write_text("# @package _global_\ndefaults:\n  - flash\n  - _self_\n"
                                              "train:\n  matmul_precison: high\n")
    with pytest.raises((ConfigCompositionException, ConfigKeyError), match="matmul_precison"):
        compose_with(["+stage=typo"], config_dir=conf)


@pytest.mark.parametrize("override", ["train.batch_size=sixteen", "model.attention=flesh", "train.device=tpu",
                                      "optim.lr=fast"])
def test_wrong_type_or_value_is_refused(override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_with([override])


def test_unknown_stage_is_refused():
    with pytest.raises(MissingConfigException, match="stage"):
        compose_with(["+stage=warp-speed"])


def test_cpu_sweep_runs_every_stage_with_the_gpu_sweeps_micro_steps():
    assert sweep_stages("speedup_cpu") == STAGES
    cfg = compose_with(["+sweep=speedup_cpu", "+stage=grad-accum"])
    assert cfg.train.total_batch_size == 524288  # the stage as written
    for stage in STAGES[STAGES.index("grad-accum"):]:
        gpu = compose_with([f"+stage={stage}"]).train
        cpu = gpt2.runs.job.with_stage_overrides(compose_with(["+sweep=speedup_cpu", f"+stage={stage}"])).train
        # as many micro-steps per step as on a GPU (32 of B=16, T=1024; big-batch 8 of B=64), CPU-sized
        assert cpu.total_batch_size // (cpu.batch_size * cpu.seq_len) == gpu.total_batch_size // (gpu.batch_size * 1024)
        assert cpu.total_batch_size == 16384 and cpu.device.value == "cpu", stage
    flash = compose_with(["+sweep=speedup_cpu", "+stage=flash"])
    assert gpt2.runs.job.with_stage_overrides(flash) == flash


def test_a_typo_in_a_stage_override_is_a_usage_error():
    from gpt2.errors import UsageError

    cfg = compose_with(["+stage=grad-accum", "+sweep.stage_overrides.grad-accum=['train.total_bath_size=8']"])
    with pytest.raises(UsageError, match="sweep.stage_overrides.grad-accum.*total_bath_size"):
        gpt2.runs.job.with_stage_overrides(cfg)


@pytest.mark.slow
def test_help_lists_the_stages_in_order_and_the_plus():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(REPO / "run.py"), "--help"], capture_output=True, text=True,
                         timeout=120).stdout
    lines = out.splitlines()
    order = lines[lines.index("== Stages (+stage=NAME, cumulative, in this order) ==") + 1].split()
    assert order == STAGES  # the help's list follows the full sweep (a new stage must be added there too)
    assert "python run.py +stage=flash" in out and "+sweep=speedup_full" in out and "train.resume" in out
    # the sizes behind each model preset, as gpt2/model/gpt.py builds them (--cfg job shows them as null)
    from gpt2.model.gpt import PRESETS

    for name, (n_layer, n_head, n_embd, block_size) in PRESETS.items():
        row = next(line.split() for line in lines if line.split()[:1] == [name])
        assert row[1:5] == [f"n_layer={n_layer}", f"n_head={n_head}", f"n_embd={n_embd}", f"block_size={block_size}"]
        assert (REPO / "conf" / "model" / f"{name}.yaml").is_file()
