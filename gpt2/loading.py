"""A model to generate with: a run folder or checkpoint of ours, or a Hugging Face GPT-2 (hub name or folder),
with what is known about it (run folder, stage, steps, validation loss). Used by `gpt2.sample` and `gpt2.serve`.

Checkpoints are read with torch.load(weights_only=True): a file holding pickled code is refused, never run.
"""

import json
from pathlib import Path

import torch

from .checkpoint import CHECKPOINT_NAME
from .errors import UsageError
from .model import GPT, GPT2_VOCAB_SIZE, PRESETS, GPTConfig

SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")


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
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a text file, a truncated zip, pickled code: torch raises many types
        raise UsageError(f"{option} {init}: {file} is not a readable checkpoint: it is corrupt or truncated, not a "
                         f"checkpoint at all, or holds more than tensors ({type(e).__name__}); only plain "
                         "weights are loaded, never code") from None
    if not isinstance(state, dict) or "model" not in state or "model_shape" not in state:
        found = ", ".join(sorted(map(str, state))[:6]) if isinstance(state, dict) else type(state).__name__
        raise UsageError(f"{option} {init}: {file} is not a gpt2-speedrun checkpoint (found {found or 'nothing'}, "
                         "expected 'model' and 'model_shape')")
    shape = {k: state["model_shape"].get(k) for k in SHAPE_KEYS}
    try:
        model = GPT(GPTConfig(**shape, attention="flash", tokenizer_vocab_size=GPT2_VOCAB_SIZE))
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise UsageError(f"{option} {init}: the weights in {file} do not fit a GPT-2 of shape {shape} "
                         f"({str(e).strip().splitlines()[0][:200]})") from None
    run_dir = file.parent
    summary = _read_json(run_dir / "summary.json")
    info = {"source": init, "kind": "checkpoint", "run_folder": str(run_dir),
            "stage": summary.get("stage") or _stage_from_yaml(state.get("config")),
            "steps": state.get("step", summary.get("steps")), "val_loss": summary.get("val_loss")}
    return model, info


def _load_hf(init: str, option: str):
    folder = Path(init).expanduser()
    config = folder / "config.json"
    hub_name = init in PRESETS and not config.is_file()  # "gpt2" beside our package folder is the hub's
    if folder.is_dir() and not hub_name:
        model_type = _read_json(config).get("model_type") if config.is_file() else None
        if model_type != "gpt2":
            what = f"a {model_type} model" if model_type else f"no {CHECKPOINT_NAME} and no config.json"
            raise UsageError(f"{option} {init}: this folder holds {what}, not GPT-2; give a run folder, a "
                             "checkpoint, or a GPT-2 folder written by transformers")
    try:
        model = GPT.from_pretrained(init)
    except Exception as e:  # OSError (not found, offline), ValueError (shapes), pickle errors, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if "weights_only" in reason or "pickle" in reason.lower():
            reason = f"{type(e).__name__}: the weights file holds more than tensors; it was not loaded"
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
