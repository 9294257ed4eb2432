"""Checkpoints that survive a kill mid-write and load without unpickling arbitrary objects.

One torch.save file from rank 0, not torch.distributed.checkpoint (DCP): under DDP every rank holds the whole
model and optimizer, so there is nothing sharded to save in parallel, and a single file is what sample, serve,
evaluate and the Hugging Face export read. The largest preset (gpt2-xl, 1.56B parameters) makes an ~19 GB file
with its AdamW moments. DCP pays once the state itself is sharded (FSDP), which this project does not do.
"""

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

from gpt2.errors import UsageError
from gpt2.files import atomic_write_bytes
from gpt2.model.files import ModelFileError, checkpoint_sizes, read_torch_file

CHECKPOINT_NAME = "checkpoint.pt"

log = logging.getLogger("gpt2.training.checkpoint")


def rng_state(device: Optional[torch.device] = None) -> dict:
    """The generators a run draws from: the CPU's, and the run's own GPU's (only that one: a checkpoint made
    on a machine with 8 GPUs must resume on a machine with 1)."""
    # only torch draws random numbers in a run (initialisation, sampling); no numpy or python RNG is used
    state = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: Optional[torch.device] = None) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and device is not None and device.type == "cuda":
        if isinstance(cuda, (list, tuple)):  # older checkpoints held every visible GPU's state
            cuda = cuda[min(device.index or 0, len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda, device)


def save_checkpoint(path: Path, *, model, optimizer, step: int, data_state: dict, config_yaml: str,
                    model_shape: dict, device: Optional[torch.device] = None,
                    wandb_run_id: Optional[str] = None) -> None:
    """`step` is the number of optimizer steps done: the resumed run starts there."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "data": data_state,
        "rng": rng_state(device),
        "config": config_yaml,
        "model_shape": model_shape,
        "wandb_run_id": wandb_run_id,  # a resumed run continues this wandb run
    }
    atomic_write_bytes(path, lambda f: torch.save(state, f))


RESUME_AUTO = "auto"  # train.resume=auto: this run's own folder (see resume_source)


def resume_source(resume: Optional[str], run_dir: Path) -> Optional[str]:
    """What train.resume loads: a checkpoint file or a run folder, as given; `auto`: this run's own folder when
    it holds a checkpoint (a requeued or restarted job goes on where it stopped), else nothing (it starts)."""
    if resume != RESUME_AUTO:
        return resume
    return str(run_dir) if (Path(run_dir) / CHECKPOINT_NAME).is_file() else None


def forget_steps_from(metrics_file: Path, first_step: int) -> None:
    """Drop the metrics.jsonl rows of steps >= first_step: an attempt that was killed logged them after its last
    checkpoint, and the run that continues in its folder logs them again. A row cut short by the kill goes too."""
    metrics_file = Path(metrics_file)
    if not metrics_file.is_file():
        return

    def kept(line: str) -> bool:
        try:
            return json.loads(line)["step"] < first_step
        except (ValueError, TypeError, KeyError):
            return False

    lines = [line for line in metrics_file.read_text().splitlines() if kept(line)]
    atomic_write_bytes(metrics_file, lambda f: f.write("".join(f"{line}\n" for line in lines).encode()))


def resolve_checkpoint_path(resume: str) -> Optional[Path]:
    """The checkpoint file that train.resume names; None for `auto`, which has no file to check before the
    run's folder is known (resume_source finds it there, or starts the run)."""
    if resume == RESUME_AUTO:
        return None
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise UsageError(f"train.resume={resume}: no checkpoint at {path}; point it at a checkpoint file "
                         f"or at a run folder that holds {CHECKPOINT_NAME}")
    return path


def load_checkpoint(resume: str, model_shape: Optional[dict] = None) -> dict:
    """The checkpoint as saved, with tensors on the CPU, read as data only and checked part by part (its
    weights against its model_shape: gpt2/model/files.py); clear errors for corrupt or mismatched files."""
    path = resolve_checkpoint_path(resume)
    try:
        state = read_torch_file(path)
    except ModelFileError as e:
        raise UsageError(f"train.resume={resume}: {e}; point train.resume at an intact checkpoint") from None
    missing = PARTS - set(state) if isinstance(state, dict) else PARTS
    if missing:
        raise UsageError(f"train.resume={resume}: {path} is not a gpt2-speedrun checkpoint "
                         f"(missing {', '.join(sorted(missing))})")
    try:
        saved_shape = checkpoint_sizes(state, path)
        check_parts(state, path)
    except ModelFileError as e:
        raise UsageError(f"train.resume={resume}: {e}; point train.resume at a checkpoint a run wrote") from None
    if model_shape is not None and saved_shape != model_shape:
        diff = {k: (saved_shape.get(k), v) for k, v in model_shape.items() if saved_shape.get(k) != v}
        described = ", ".join(f"{k}: checkpoint {a} vs run {b}" for k, (a, b) in diff.items())
        raise UsageError(f"train.resume={resume}: the checkpoint is for a different model ({described}); "
                         "resume with the same model settings as the run that saved it")
    return state


PARTS = {"model", "optimizer", "step", "data", "rng", "config", "model_shape"}


def check_parts(state: dict, path: Path) -> None:
    """The parts beside the weights have the types save_checkpoint writes: a file of nested junk is refused
    here, in one line, not by a traceback half-way through resuming."""
    rng = state["rng"]
    problems = [
        (type(state["step"]) is not int or state["step"] < 0, "'step' is not a number of steps"),
        (not isinstance(state["data"], dict), "'data' is not a data position"),
        (not isinstance(rng, dict) or not torch.is_tensor(rng.get("torch")) or rng["torch"].dtype != torch.uint8,
         "'rng' holds no random generator state"),
        (not isinstance(state["optimizer"], dict) or not isinstance(state["optimizer"].get("state"), dict)
         or not isinstance(state["optimizer"].get("param_groups"), list), "'optimizer' is not an optimizer's state"),
        (not isinstance(state["config"], str), "'config' is not the run's YAML"),
    ]
    for wrong, what in problems:
        if wrong:
            raise ModelFileError(f"{path}: {what}")


def _flat(node, prefix: str = "") -> dict:
    """{'a.b': value} for a nested dict."""
    if not isinstance(node, dict):
        return {prefix: node}
    return {k: v for key, child in node.items()
            for k, v in _flat(child, f"{prefix}.{key}" if prefix else str(key)).items()}


def config_changes(saved_yaml: str, run_yaml: str) -> list:
    """'key: old -> new' for every setting (train.resume aside) in which this run differs from the saved one."""
    old, new = (_flat(OmegaConf.to_container(OmegaConf.create(y))) for y in (saved_yaml, run_yaml))
    return [f"{k}: {old.get(k)} -> {new.get(k)}" for k in sorted(old.keys() | new.keys())
            if k != "train.resume" and old.get(k) != new.get(k)]


def load_optimizer_state(optimizer, state: dict) -> list:
    """Load the optimizer's moments and step counts, but keep this run's hyper-parameters.

    torch's load_state_dict brings back every param-group setting of the saved run (betas, eps, weight
    decay, fused, ...): a run configured for GPT-3 settings would silently continue with the old ones. The
    run's config wins (the learning rate is set each step anyway); 'key: old -> new' for each one that differs.
    """
    configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    changed = []
    for i, (group, mine) in enumerate(zip(optimizer.param_groups, configured)):
        for key, new in mine.items():
            old = group.get(key)
            if key != "lr" and old != new and not (isinstance(old, (tuple, list)) and list(old) == list(new)):
                changed.append(f"param group {i} {key}: {old} -> {new}")
        group.update(mine)
        if group.get("fused") or group.get("capturable"):  # these kernels keep step counts on the device
            for p in group["params"]:
                step = optimizer.state.get(p, {}).get("step")
                if torch.is_tensor(step):
                    optimizer.state[p]["step"] = step.to(p.device, torch.float32)
    return changed


def resume_into(resume: str, *, model, optimizer, loader, model_shape: dict, config_yaml: str,
                device: Optional[torch.device] = None) -> dict:
    """Restore model, optimizer, data position and RNG from train.resume; {'resumed_from', 'start_step'}."""
    path = resolve_checkpoint_path(resume)
    state = load_checkpoint(resume, model_shape)
    saved_optimizer = OmegaConf.select(OmegaConf.create(state["config"]), "optim.name")
    run_optimizer = OmegaConf.select(OmegaConf.create(config_yaml), "optim.name")
    if saved_optimizer is not None and saved_optimizer != run_optimizer:
        raise UsageError(f"train.resume={resume}: the checkpoint was trained with optim.name={saved_optimizer}, this "
                         f"run asks for optim.name={run_optimizer}; resume with optim.name={saved_optimizer}")
    try:
        model.load_state_dict(state["model"])
        optimizer_changes = load_optimizer_state(optimizer, state["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:  # other groups or optimizer
        reason = f"no {e} in it" if isinstance(e, KeyError) else str(e).strip().splitlines()[0]
        raise UsageError(f"train.resume={resume}: the checkpoint does not fit this run's model or optimizer "
                         f"({reason}); resume with the stage and settings of the run that saved it") from None
    try:
        loader.load_state_dict(state["data"])
        set_rng_state(state["rng"], device)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:  # written by something else
        raise UsageError(f"train.resume={resume}: {path} holds a data position or random state this run cannot "
                         f"use ({type(e).__name__}: {str(e).strip()[:80]}); point train.resume at a checkpoint "
                         "a run wrote") from None
    changes = config_changes(state["config"], config_yaml)
    if changes:
        log.warning(f"train.resume: this run's settings differ from the saved run's, so it will not continue "
                    f"exactly as that run would have: {'; '.join(changes)}")
    if optimizer_changes:
        log.warning(f"train.resume: the optimizer continues with this run's settings, not the checkpoint's: "
                    f"{'; '.join(optimizer_changes)}")
    return {"resumed_from": str(path), "start_step": state["step"], "resumed_wandb_id": state.get("wandb_run_id")}
