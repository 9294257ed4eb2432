"""Hostile or broken model files: every command that loads one refuses it in one line naming the file and the
option, exit 2, before any model is built, and nothing in the file runs.

Classes of file: pickled code (a payload that would create a marker file), sizes that ask for far more memory
than the file holds (a model_shape or config.json claiming more layers than its tensors, views of one number),
malformed sizes, and truncated, empty or mismatched files. Every case goes through each entry point's code in
this process (the --init commands' main(), checkpoint.load_checkpoint for train.resume, train.build_model for
model.init_from), where a guard fails the test if a model is built off the meta device; a file of each class
goes through each real command (`python run.py`, `python -m gpt2.sample` ...), whose peak memory is measured.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gpt2.training import checkpoint
from gpt2.training import loop as train
from gpt2 import evaluate as evaluate_cmd
from gpt2 import sample as sample_cmd
from gpt2.training.checkpoint import CHECKPOINT_NAME, save_checkpoint
from gpt2.errors import UsageError
from gpt2.model.gpt import GPT, GPTConfig
from gpt2.model.files import ModelFileError
from gpt2.training.optim import build_optimizer
from helpers import REPO, SHAPE_KEYS, compose_with

LARGE = dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024, vocab_size=50257)  # gpt2-large: 3.1 GB in fp32
PEAK_RSS_LIMIT = 1.5 * 2**30  # a refusal takes ~0.4 GB (python, torch); building the claimed model takes 3+ GB


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def strided_weights(sizes: dict) -> dict:
    """A state dict of the right names and shapes for `sizes`, every tensor a view of one float (strides 0)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT(GPTConfig(**sizes)).state_dict().items()}
    one = torch.zeros(1)
    return {k: one.as_strided(shape, (0,) * len(shape)) for k, shape in shapes.items()}


def with_model_shape(**change):
    return lambda good, marker: {**good, "model_shape": {**good["model_shape"], **change}}


def with_weights(edit):
    return lambda good, marker: {**good, "model": edit(dict(good["model"]))}


# case: (the checkpoint.pt to write from the good one's state, words the message must hold)
OURS = {
    "pickled-code": (lambda good, marker: {**good, "model": Payload(marker)}, "pickled code"),
    "claims-10000-layers": (with_model_shape(n_layer=10000, n_embd=100000), "n_layer=10000 must be a whole number"),
    "claims-gpt2-large": (with_model_shape(**LARGE), "holds 2 blocks of weights (transformer.h.N), but its "
                                                     "model_shape says n_layer=36"),
    "views-of-one-number": (lambda good, marker: {**good, "model": strided_weights(LARGE), "model_shape": LARGE},
                            "views that repeat the same numbers"),
    "model-shape-a-list": (lambda good, marker: {**good, "model_shape": [2, 2, 64]}, "model_shape is a list"),
    "model-shape-missing-keys": (lambda good, marker: {**good, "model_shape": {"n_layer": 2}},
                                 "model_shape lacks n_head, n_embd, block_size, vocab_size"),
    "model-shape-strings": (with_model_shape(n_layer="two"), "n_layer='two' must be a whole number"),
    "model-shape-negative": (with_model_shape(n_embd=-64), "n_embd=-64 must be a whole number"),
    "model-shape-bool": (with_model_shape(n_layer=True), "n_layer=True must be a whole number"),
    "model-shape-nested": (with_model_shape(n_head={"n": [2]}), "n_head={'n': [2]} must be a whole number"),
    "heads-do-not-divide": (with_model_shape(n_head=3), "n_embd=64 is not divisible by n_head=3"),
    "truncated": ("half", "is corrupt or truncated"),
    "empty": ("empty", "is corrupt or truncated: the file is empty"),
    "wrong-tensor-shape": (with_weights(lambda w: {**w, "transformer.h.0.attn.c_attn.weight": torch.zeros(3, 3)}),
                           "transformer.h.0.attn.c_attn.weight has shape (3, 3)"),
    "missing-tensor": (with_weights(lambda w: {k: v for k, v in w.items() if k != "transformer.ln_f.bias"}),
                       "missing: ['transformer.ln_f.bias']"),
    "integer-weights": (with_weights(lambda w: {**w, "transformer.ln_f.bias": torch.zeros(64, dtype=torch.long)}),
                        "transformer.ln_f.bias holds torch.int64, not floating-point weights"),
}
# only train.resume reads these parts
RESUME_ONLY = {
    "step-not-a-number": (lambda good, marker: {**good, "step": "ten"}, "'step' is not a number of steps"),
    "rng-junk": (lambda good, marker: {**good, "rng": {"torch": torch.zeros(3)}}, "'rng' holds no random generator"),
    "data-junk": (lambda good, marker: {**good, "data": [1, 2]}, "'data' is not a data position"),
}


def config_with(**change):
    def edit(folder, marker):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **change}))
    return edit


def weights_as_bin(state):
    def edit(folder, marker):
        (folder / "model.safetensors").unlink()
        torch.save(state(folder, marker), folder / "pytorch_model.bin")
    return edit


def safetensors_with(edit_weights):
    def edit(folder, marker):
        from safetensors.torch import load_file, save_file

        save_file(edit_weights(load_file(folder / "model.safetensors")), folder / "model.safetensors")
    return edit


def cut(name, keep):
    def edit(folder, marker):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: int(len(data) * keep)])
    return edit


def hf_strided(folder, marker):
    with_large = {**json.loads((folder / "config.json").read_text()), "n_layer": 36, "n_head": 20, "n_embd": 1280,
                  "n_positions": 1024}
    (folder / "config.json").write_text(json.dumps(with_large))
    return {k: v.t() if k.endswith(GPT._CONV1D) else v for k, v in strided_weights(LARGE).items()
            if k != "lm_head.weight"}


def shard_outside(folder, marker):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"transformer.wte.weight": "../hf-good/model.safetensors"}}))


def both_formats(folder, marker):  # model.safetensors is preferred: the pickle beside it is never opened
    torch.save({"transformer.wte.weight": Payload(marker)}, folder / "pytorch_model.bin")


def long_context(folder, marker):  # 2 layers of 65,536 positions, 8 wide: explicit-mask attention needs 8 GiB
    from transformers import GPT2Config, GPT2LMHeadModel

    shutil.rmtree(folder)
    config = GPT2Config(vocab_size=50257, n_positions=65536, n_embd=8, n_layer=2, n_head=1)
    GPT2LMHeadModel(config).save_pretrained(folder)


# case: (edit of a copy of a good transformers GPT-2 folder, file the message names, words it must hold)
HF = {
    "pickled-code": (weights_as_bin(lambda folder, marker: {"transformer.wte.weight": Payload(marker)}),
                     "pytorch_model.bin", "pickled code"),
    "claims-10000-layers": (config_with(n_layer=10000, n_embd=100000), "config.json",
                            "n_layer=10000 must be a whole number"),
    "claims-gpt2-large": (config_with(n_layer=36, n_head=20, n_embd=1280), "model.safetensors",
                          "holds 2 blocks of weights (transformer.h.N), but"),
    "views-of-one-number": (weights_as_bin(hf_strided), "pytorch_model.bin", "views that repeat the same numbers"),
    "config-strings": (config_with(n_layer="two"), "config.json", "n_layer='two' must be a whole number"),
    "config-negative": (config_with(n_positions=-1), "config.json", "n_positions=-1 must be a whole number"),
    "config-not-json": (lambda folder, marker: (folder / "config.json").write_text("{n_layer: 2"), "config.json",
                        "is not readable JSON"),
    "config-a-list": (lambda folder, marker: (folder / "config.json").write_text("[1, 2]"), "config.json",
                      "holds a list, not a model configuration"),
    "truncated-safetensors": (cut("model.safetensors", 0.5), "model.safetensors", "is corrupt or truncated"),
    "empty-safetensors": (cut("model.safetensors", 0), "model.safetensors", "is corrupt or truncated"),
    "truncated-bin": (lambda folder, marker: truncated_bin(folder), "pytorch_model.bin", "is corrupt or truncated"),
    "wrong-tensor-shape": (safetensors_with(lambda w: {**w, "transformer.h.1.mlp.c_fc.weight": torch.zeros(16, 3)}),
                           "model.safetensors", "transformer.h.1.mlp.c_fc.weight has shape (16, 3)"),
    "missing-tensor": (safetensors_with(lambda w: {k: v for k, v in w.items() if k != "transformer.ln_f.bias"}),
                       "model.safetensors", "missing: ['transformer.ln_f.bias']"),
    "shard-outside-the-folder": (shard_outside, "model.safetensors.index.json", "which is not a file beside it"),
}
# model.init_from only: explicit-mask attention is the default stage's, the other commands use flash
INIT_FROM_ONLY = {
    "long-context-few-weights": (long_context, "config.json", "GiB of causal masks"),
}


def truncated_bin(folder):
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    cut("pytorch_model.bin", 0.5)(folder, None)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every case's folder, made once: {"ours": {case: run folder}, "hf": {case: HF folder}, "marker": path
    a payload would create, "text": a small training text, "rows": a HellaSwag file, "good": ...}."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tmp = tmp_path_factory.mktemp("model_files")
    marker = tmp / "PAYLOAD_RAN"
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny"))
    good_dir = tmp / "ours-good"
    save_checkpoint(good_dir / CHECKPOINT_NAME, model=model, step=1, data_state={"next_chunk": 1},
                    optimizer=build_optimizer(model, compose_with([]).optim, torch.device("cpu")),
                    config_yaml="model:\n  name: tiny\n", model_shape={k: getattr(model.config, k) for k in SHAPE_KEYS})
    good_bytes = (good_dir / CHECKPOINT_NAME).read_bytes()
    good = torch.load(good_dir / CHECKPOINT_NAME, weights_only=True)
    ours = {}
    for case, (make, _) in {**OURS, **RESUME_ONLY}.items():
        folder = tmp / f"ours-{case}"
        folder.mkdir()
        if make == "half":
            (folder / CHECKPOINT_NAME).write_bytes(good_bytes[: len(good_bytes) // 2])
        elif make == "empty":
            (folder / CHECKPOINT_NAME).write_bytes(b"")
        else:
            torch.save(make(good, marker), folder / CHECKPOINT_NAME)
        ours[case] = folder

    hf_good = tmp / "hf-good"
    config = GPT2Config(vocab_size=50257, n_positions=64, n_embd=16, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(hf_good)
    hf = {}
    for case, (edit, _, _) in {**HF, **INIT_FROM_ONLY, "both-formats": (both_formats, None, None)}.items():
        folder = tmp / f"hf-{case}"
        shutil.copytree(hf_good, folder)
        edit(folder, marker)
        hf[case] = folder

    text = tmp / "text.txt"
    text.write_text("".join(f"Line {i}: to be, or not to be, that is the question.\n" for i in range(300)))
    rows = tmp / "hellaswag_rows.jsonl"
    rows.write_text(json.dumps({"ind": 1, "ctx": "A man is sitting on a roof. he", "label": 0,
                                "endings": ["starts pulling up roofing.", "flies.", "sleeps.", "eats."]}) + "\n")
    return {"ours": ours, "hf": hf, "marker": marker, "text": text, "rows": rows, "good_dir": good_dir,
            "hf_good": hf_good, "tmp": tmp}


@pytest.fixture
def no_model_built(monkeypatch):
    """Fails the test when a GPT is built anywhere but on the meta device (where the checks build the claimed
    shape to compare with, allocating nothing): a refusal must come before any allocation."""
    built = []
    original = GPT.__init__

    def guarded(self, config):
        if torch.get_default_device().type != "meta":
            built.append(config)
            raise AssertionError(f"a model of {config} was built before its file was refused")
        original(self, config)

    monkeypatch.setattr(GPT, "__init__", guarded)
    return built


# ---- the three --init commands, in this process ---------------------------------------------------

def _serve_main(argv):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from gpt2 import serve

    return serve.main(argv)


COMMANDS = {
    "sample": lambda init, files: sample_cmd.main(["--init", str(init), "--device", "cpu"]),
    "serve": lambda init, files: _serve_main(["--init", str(init), "--device", "cpu", "--port", "0"]),
    "evaluate": lambda init, files: evaluate_cmd.main(["hellaswag", "--init", str(init), "--data",
                                                       str(files["rows"]), "--device", "cpu"]),
}


def assert_one_line_refusal(err: str, option: str, file, words: str, files) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {option}"), lines[0]
    assert str(file) in lines[0] and words in lines[0], lines[0]
    assert "Traceback" not in err and "weights_only" not in err, err  # never torch's advice to load code
    assert not files["marker"].exists()  # the payload never ran


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", OURS)
def test_commands_refuse_bad_checkpoints(case, command, files, capsys, no_model_built):
    init = files["ours"][case]
    assert COMMANDS[command](init, files) == 2
    assert_one_line_refusal(capsys.readouterr().err, f"--init {init}:", init / CHECKPOINT_NAME, OURS[case][1], files)
    assert not no_model_built


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", HF)
def test_commands_refuse_bad_hugging_face_folders(case, command, files, capsys, no_model_built):
    init = files["hf"][case]
    _, name, words = HF[case]
    assert COMMANDS[command](init, files) == 2
    assert_one_line_refusal(capsys.readouterr().err, f"--init {init}:", init / name, words, files)
    assert not no_model_built


def test_safetensors_are_preferred_to_a_pickle_beside_them(files, capsys):
    folder = files["hf"]["both-formats"]
    assert sample_cmd.main(["--init", str(folder), "--device", "cpu", "--num-samples", "1",
                            "--max-new-tokens", "2"]) == 0, capsys.readouterr().err
    assert not files["marker"].exists()
    loaded, good = (GPT.from_pretrained(str(f)) for f in (folder, files["hf_good"]))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), good.state_dict().values()))


def test_a_hub_name_reads_the_hubs_cached_safetensors(files, monkeypatch, tmp_path):
    """gpt2 ... gpt2-xl come through the hub's cache (offline here), whose model.safetensors, like
    openai-community/gpt2's, names tensors without 'transformer.' and carries the causal-mask buffers."""
    import huggingface_hub.constants
    from safetensors.torch import load_file, save_file

    repo = tmp_path / "models--openai-community--gpt2"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copy(files["hf_good"] / "config.json", snapshot)
    weights = {k.removeprefix("transformer."): v for k, v in load_file(files["hf_good"] / "model.safetensors").items()}
    masks = {f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 64, 64)) for i in range(2)}
    save_file({**weights, **masks}, snapshot / "model.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    loaded, good = GPT.from_pretrained("gpt2"), GPT.from_pretrained(str(files["hf_good"]))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), good.state_dict().values()))
    with pytest.raises(OSError, match="gpt2-xl is no folder here, and the Hugging Face hub did not give "
                                      "openai-community/gpt2-xl"):
        GPT.from_pretrained("gpt2-xl")


def test_from_pretrained_refuses_long_context_masks_before_building(files, no_model_built):
    folder = files["hf"]["long-context-few-weights"]
    with pytest.raises(ModelFileError, match="8.0 GiB of causal masks with explicit-mask attention.*"
                                             "use model.attention=flash"):
        GPT.from_pretrained(str(folder), attention="manual")
    assert not no_model_built


# ---- train.resume and model.init_from, in this process ---------------------------------------------

TINY_SHAPE = {k: getattr(GPTConfig.from_preset("tiny"), k) for k in SHAPE_KEYS}


@pytest.mark.parametrize("case", {**OURS, **RESUME_ONLY})
def test_resume_refuses_bad_checkpoints(case, files):
    folder = files["ours"][case]
    with pytest.raises(UsageError) as refused:
        checkpoint.load_checkpoint(str(folder), TINY_SHAPE)
    assert_one_line_refusal(f"error: {refused.value}", f"train.resume={folder}:", folder / CHECKPOINT_NAME,
                            {**OURS, **RESUME_ONLY}[case][1], files)


@pytest.mark.parametrize("case", {**HF, **INIT_FROM_ONLY})
def test_init_from_refuses_bad_folders(case, files, no_model_built):
    folder = files["hf"][case]
    _, name, words = {**HF, **INIT_FROM_ONLY}[case]
    cfg = compose_with(["model=tiny", f"model.init_from={folder}"])
    with pytest.raises(UsageError) as refused:  # the default stage's explicit-mask attention, as a run builds it
        train.build_model(cfg.model, GPTConfig.from_preset("tiny", attention="manual"), torch.device("cpu"))
    assert_one_line_refusal(f"error: {refused.value}", f"model.init_from={folder}:", folder / name, words, files)
    assert not no_model_built


# ---- subprocesses: `python run.py` and the three commands, one file of each class -------------------

def run_measured(args, timeout=300):
    """(exit code, stdout + stderr, peak RSS in bytes) of one command, its memory measured by wait4."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return proc.returncode, out.read(), usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def train_args(files, run_dir, option):
    return [sys.executable, str(REPO / "run.py"), "model=tiny", "train.device=cpu", "train.steps=1",
            "train.batch_size=2", "train.seq_len=32", "train.val_batches=1", f"data.path={files['text']}",
            f"data.cache_dir={files['tmp'] / 'cache'}", f"hydra.run.dir={run_dir}", option]


# (option, kind, case): a file of each class for each option, and for each command (its main() sees them all)
SUBPROCESS_CASES = [
    ("train.resume", "ours", "pickled-code"), ("train.resume", "ours", "views-of-one-number"),
    ("train.resume", "ours", "model-shape-a-list"), ("train.resume", "ours", "truncated"),
    ("model.init_from", "hf", "pickled-code"), ("model.init_from", "hf", "claims-gpt2-large"),
    ("model.init_from", "hf", "long-context-few-weights"), ("model.init_from", "hf", "truncated-bin"),
    ("sample", "ours", "pickled-code"), ("sample", "hf", "claims-gpt2-large"), ("sample", "ours", "truncated"),
    ("serve", "hf", "pickled-code"), ("serve", "ours", "claims-gpt2-large"), ("serve", "hf", "truncated-safetensors"),
    ("evaluate", "ours", "views-of-one-number"), ("evaluate", "hf", "views-of-one-number"),
    ("evaluate", "hf", "missing-tensor"),
]
CLI_ARGS = {"sample": ["-m", "gpt2.sample", "--device", "cpu"], "serve": ["-m", "gpt2.serve", "--device", "cpu"],
            "evaluate": ["-m", "gpt2.evaluate", "hellaswag", "--device", "cpu"]}


def expected(kind, case):
    """(the file the message names, words it holds) for a case."""
    if kind == "ours":
        return CHECKPOINT_NAME, {**OURS, **RESUME_ONLY}[case][1]
    return {**HF, **INIT_FROM_ONLY}[case][1:]


@pytest.fixture(scope="module")
def refusals(files):
    """Every subprocess case run once, two at a time (each start-up is seconds): {case: result}."""
    def attempt(key):
        option, kind, case = key
        init = files[kind][case]
        if option in CLI_ARGS:
            extra = ["--data", str(files["rows"])] if option == "evaluate" else []
            return run_measured([sys.executable, *CLI_ARGS[option], *extra, "--init", str(init)])
        return run_measured(train_args(files, files["tmp"] / "runs" / f"{option}-{case}", f"{option}={init}"))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(SUBPROCESS_CASES, pool.map(attempt, SUBPROCESS_CASES)))


@pytest.mark.parametrize("option, kind, case", SUBPROCESS_CASES)
@pytest.mark.slow
def test_each_command_refuses_in_its_own_process(option, kind, case, files, refusals):
    if option == "serve":
        pytest.importorskip("uvicorn")
    rc, out, peak = refusals[(option, kind, case)]
    init = files[kind][case]
    name, words = expected(kind, case)
    assert rc == 2, out[-2000:]
    said = f"--init {init}:" if option in CLI_ARGS else f"{option}={init}:"
    assert_one_line_refusal(out, said, init / name, words, files)
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / 2**30:.1f} GiB"
    assert not (files["tmp"] / "runs" / f"{option}-{case}" / CHECKPOINT_NAME).exists()


@pytest.mark.slow
def test_training_starts_from_safetensors_beside_a_pickle(files):
    folder = files["hf"]["both-formats"]
    rc, out, _ = run_measured(train_args(files, files["tmp"] / "runs" / "both-formats", f"model.init_from={folder}"))
    assert rc == 0, out[-2000:]
    assert not files["marker"].exists()
