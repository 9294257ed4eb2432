"""Optimizer, learning-rate schedule and gradient norm: the training side of the border with the model."""

import inspect
import math
from typing import Iterable, Optional

import torch

from gpt2.config import option_str


def build_optimizer(model: torch.nn.Module, optim_cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW or SGD as `optim_cfg` says; GPT-3 style decays only the 2-D weights (matmuls, embeddings)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optim_cfg.decay_2d_only:
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": optim_cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},  # biases, LayerNorm gains
        ]
    else:
        groups = [{"params": params, "weight_decay": optim_cfg.weight_decay}]
    if option_str(optim_cfg.name) == "sgd":
        return torch.optim.SGD(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum)
    extra = {}
    if optim_cfg.fused and fused_adamw_supported(device):
        extra["fused"] = True
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, **extra)


def fused_adamw_supported(device: torch.device) -> bool:
    """The fused AdamW kernel exists for CUDA (and, in recent torch, CPU and MPS)."""
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    try:
        p = torch.nn.Parameter(torch.zeros(1, device=device))
        p.grad = torch.zeros_like(p)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, ValueError):
        return False


def lr_at(step: int, optim_cfg, total_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based): constant, or linear warm-up then cosine to a floor.

    A pure function of the step rather than a torch.optim.lr_scheduler: a resumed run needs only the step (no
    scheduler state in the checkpoint), and the curve is build-nanogpt's, which LambdaLR would only wrap."""
    max_lr = optim_cfg.lr
    if option_str(optim_cfg.schedule) == "constant":
        return max_lr
    min_lr = max_lr * optim_cfg.min_lr_ratio
    warmup = optim_cfg.warmup_steps
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total_steps:
        return min_lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def grad_norm_and_clip(params: Iterable[torch.nn.Parameter], max_norm: Optional[float]) -> torch.Tensor:
    """The global L2 norm of the gradients (always reported), clipping to max_norm when it is set."""
    params = [p for p in params if p.grad is not None]
    if max_norm is not None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norms = torch._foreach_norm([p.grad for p in params])
    return torch.linalg.vector_norm(torch.stack(norms))


def describe_optimizer(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer as torch holds it (for `effective` in summary.json), not as the config asked."""
    groups = optimizer.param_groups
    first = groups[0]
    return {
        "class": type(optimizer).__name__,
        "betas": list(first["betas"]) if "betas" in first else None,
        "eps": first.get("eps"),
        "momentum": first.get("momentum"),
        "weight_decay_groups": [
            {"weight_decay": g["weight_decay"], "tensors": len(g["params"]),
             "params": sum(p.numel() for p in g["params"])} for g in groups],
        "fused": bool(first.get("fused")),
        "foreach": first.get("foreach"),
    }
