"""A model to generate with: a run folder or checkpoint of ours, or a Hugging Face GPT-2 (hub name or folder),
with what is known about it (run folder, stage, steps, validation loss). Used by `gpt2.sample` and `gpt2.serve`.

Files are read as data, never run, and checked before a model is built (gpt2/model/files.py): a file holding
pickled code, a truncated one, or one whose tensors do not fit the shape it claims is one UsageError.
"""

import json
from pathlib import Path

from gpt2.training.checkpoint import CHECKPOINT_NAME
from gpt2.errors import UsageError
from gpt2.model.gpt import GPT, GPT2_VOCAB_SIZE, GPTConfig
from gpt2.model.files import ModelFileError, checkpoint_sizes, read_torch_file


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _stage_from_yaml(config_yaml) -> str:
    try:
        from omegaconf import OmegaConf
        return OmegaConf.create(config_yaml).stage.name
    except Exception:  # an older or foreign config: the stage is only for display
        return None


def _load_ours(init: str, path: Path, option: str):
    file = path / CHECKPOINT_NAME if path.is_dir() else path
    try:
        state = read_torch_file(file)
    except ModelFileError as e:
        raise UsageError(f"{option} {init}: not a readable checkpoint: {e}") from None
    try:
        shape = checkpoint_sizes(state, file)  # model_shape and every tensor checked before anything is built
    except ModelFileError as e:
        raise UsageError(f"{option} {init}: {e}") from None
    model = GPT(GPTConfig(**shape, attention="flash", tokenizer_vocab_size=GPT2_VOCAB_SIZE))
    model.load_state_dict(state["model"])
    run_dir = file.parent
    summary = _read_json(run_dir / "summary.json")
    info = {"source": init, "kind": "checkpoint", "run_folder": str(run_dir),
            "stage": summary.get("stage") or _stage_from_yaml(state.get("config")),
            "steps": state["step"] if type(state.get("step")) is int else summary.get("steps"),
            "val_loss": summary.get("val_loss")}
    return model, info


def _load_hf(init: str, option: str):
    try:
        model = GPT.from_pretrained(init)
    except ModelFileError as e:  # read and checked before building: says which file and what is wrong
        folder = Path(init).expanduser()
        hint = (f"; give a run folder (holding {CHECKPOINT_NAME}), a checkpoint file, or a GPT-2 folder written by "
                "transformers") if folder.is_dir() and not (folder / "config.json").is_file() else ""
        raise UsageError(f"{option} {init}: {e}{hint}") from None
    except Exception as e:  # OSError (no such folder, offline), ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:400]
        raise UsageError(f"{option} {init}: not a checkpoint, run folder or loadable GPT-2 "
                         f"({reason})") from None
    return model, {"source": init, "kind": "huggingface", "run_folder": None, "stage": None,
                   "steps": None, "val_loss": None}


def load_model(init: str, option: str = "--init"):
    """(model in eval mode on the CPU, info dict). Errors are UsageErrors that name `option`."""
    path = Path(init).expanduser()
    if path.is_file() or (path / CHECKPOINT_NAME).is_file():
        model, info = _load_ours(init, path, option)
    else:
        model, info = _load_hf(init, option)
    info["params"] = model.num_params()
    info["block_size"] = model.config.block_size
    return model.eval(), info


def describe(info: dict) -> str:
    """One line: what is loaded."""
    parts = [info.get("run_folder") or info["source"]]
    for key, label in (("stage", "stage"), ("steps", "steps"), ("val_loss", "val loss")):
        value = info.get(key)
        if value is not None:
            parts.append(f"{label} {value:.4f}" if isinstance(value, float) else f"{label} {value}")
    parts.append(f"{info['params'] / 1e6:.1f}M parameters")
    return ", ".join(parts)
