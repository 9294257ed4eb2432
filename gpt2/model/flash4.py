"""FlashAttention-4 behind model.attention=flash4 (the flash4 stage): the CuTe DSL kernels of the flash-attn-4
package, written for Hopper (sm90) and Blackwell (sm100+), forward and backward, causal, bf16.

It takes q, k, v as the attention's projection leaves them, (B, T, heads, head size), so neither the transposes
SDPA needs nor their copies are made. The package is imported only when a flash4 model first runs, and the
check before a run (gpt2/training/checks.py) refuses what it cannot run in one line: no package, a device other
than a Hopper or Blackwell GPU, or no bf16/fp16 autocast. Generation with a KV cache keeps SDPA (gpt.py).

Under torch.compile the kernel is a graph break (torch.compiler.disable): its autograd function is plain Python
that Dynamo does not trace, so each layer's attention runs eagerly between compiled graphs, as the package
itself advises for torch.compile. The package is a pre-release on PyPI: `pip install --pre flash-attn-4`.
"""

import functools
from typing import Optional

import torch

INSTALL = "pip install --pre flash-attn-4"  # PyPI holds pre-releases only (4.0.0bN): --pre is needed
HEAD_SIZE_MULTIPLE = 8  # the kernels' tiles take head sizes in multiples of 8 (GPT-2's 64 is one)


@functools.lru_cache(maxsize=1)
def _flash_attn_func():
    from flash_attn.cute import flash_attn_func

    return flash_attn_func


@torch.compiler.disable  # a graph break: Dynamo cannot trace the CuTe DSL launch (see the docstring)
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(hs)) v for (B, T, heads, hs) bf16/fp16 CUDA tensors, as (B, T, heads, hs)."""
    out = _flash_attn_func()(q, k, v, causal=True)
    return out[0] if isinstance(out, tuple) else out  # (out, lse) in the betas that return the log-sum-exp


def import_problem() -> Optional[str]:
    """Why `flash_attn.cute` does not import here (absent, or present without what it needs: nvidia-cutlass-dsl,
    cuda-python; a broken FlashAttention-2 beside it), or None. Imported for real, as the first forward would."""
    try:
        import flash_attn.cute  # noqa: F401
    except Exception as e:  # ImportError, or whatever a broken install raises while it loads
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return None


def unsupported_reason(device: torch.device, autocast_dtype: str, head_size: int) -> Optional[str]:
    """Why FlashAttention-4 cannot run a model of `head_size` on `device` under this autocast, or None."""
    if device.type != "cuda":
        return f"its kernels run on NVIDIA GPUs only, and this run is on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10, 11):
        return (f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; its kernels are "
                "written for Hopper (9.x) and Blackwell (10.x, 11.x)")
    if autocast_dtype not in ("bf16", "fp16"):
        return f"its kernels take bf16 or fp16, and train.autocast_dtype is {autocast_dtype}"
    if head_size % HEAD_SIZE_MULTIPLE:
        return f"the head size n_embd/n_head = {head_size} is not a multiple of {HEAD_SIZE_MULTIPLE}"
    problem = import_problem()
    if problem:
        return f"flash_attn.cute does not import ({problem}): {INSTALL}"
    return None
