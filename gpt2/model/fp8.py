"""FP8 matmuls with dynamic per-tensor scaling (the recipe of torchao's float8 training, "tensorwise").

A tensor goes to FP8 with a scale from its absolute maximum: t8 = (t * fmax / amax) in float8, so its
largest entry lands on the format's largest number, and the matmul takes the inverse scales back
(torch._scaled_mm multiplies the product by scale_a * scale_b). Activations and weights use e4m3 (3
mantissa bits, up to 448), gradients e5m2 (2 mantissa bits, up to 57344: the range they need). Hopper
(sm90) and Ada (sm89) run these matmuls at twice the bf16 rate; on a CPU the same numbers come from an fp32
matmul of the FP8 values (fp8_mm), so the numerics are testable anywhere.

What the GPU kernels (cuBLASLt) require, and the callers arrange: the contraction dimension K and the
output's columns N multiples of 16, the first operand row-major (M, K), the second column-major (K, N)
(i.e. both K-contiguous: `b.t().contiguous().t()` of a row-major (K, N)), the scales fp32 with one
element each, and never e5m2 times e5m2. The CPU checks none of this; tests/test_fp8_head.py does.

Written here rather than taken from torchao: torchao's float8 training swaps nn.Linear modules for its own, and
the classifier here is no nn.Linear call but three matmuls inside the chunked fused loss (gpt2/model/fused_loss.py);
torchao's releases also pin narrow torch versions, where this needs only torch._scaled_mm.
"""

from typing import Optional, Tuple

import torch

E4M3 = torch.float8_e4m3fn  # activations and weights
E5M2 = torch.float8_e5m2  # gradients
ALIGNMENT = 16  # K and N of every FP8 matmul on a GPU
AMAX_EPS = 1e-12  # an all-zero tensor gets a finite scale (torchao's EPS)


def to_fp8(t: torch.Tensor, dtype: torch.dtype = E4M3) -> Tuple[torch.Tensor, torch.Tensor]:
    """t in float8 with a dynamic per-tensor scale, and the inverse scale (fp32, 0-dim) to multiply back."""
    fmax = torch.finfo(dtype).max
    amax = t.detach().abs().amax().float().clamp(min=AMAX_EPS)
    scale = fmax / amax
    return (t.float() * scale).clamp(-fmax, fmax).to(dtype), scale.reciprocal()


def column_major(t8: torch.Tensor) -> torch.Tensor:
    """The same (K, N) matrix stored column by column: the layout _scaled_mm's second operand needs."""
    return t8.t().contiguous().t()


def fp8_mm(a8: torch.Tensor, a_inv_scale: torch.Tensor, b8: torch.Tensor, b_inv_scale: torch.Tensor,
           out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """(a8 * a_inv_scale) @ (b8 * b_inv_scale) in out_dtype; a8 (M, K) row-major, b8 (K, N) column-major.
    fast_accum: Hopper's faster, less precise FP8 accumulation (torchao: forward yes, gradients no).

    On a CPU the same numbers come from the fp32 matmul of the FP8 values (every product of two FP8 numbers
    is exact in fp32, summed in fp32 as the tensor cores do): torch 2.13's CPU _scaled_mm takes 1.2 s for an
    e4m3 (256, 64) x (64, 4096) product, where this takes 2 ms (tests/test_fp8_head.py compares the two)."""
    if a8.device.type == "cpu":
        return ((a8.float() @ b8.float()) * (a_inv_scale * b_inv_scale)).to(out_dtype)
    return torch._scaled_mm(a8, b8, scale_a=a_inv_scale, scale_b=b_inv_scale, out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


def fp8_unsupported_reason(device: torch.device) -> Optional[str]:
    """Why FP8 matmuls cannot run on this device, or None when they can (CPU; CUDA from sm89, Ada/Hopper)."""
    if not hasattr(torch, "float8_e4m3fn"):
        return f"torch {torch.__version__} has no float8 types (torch 2.1 or newer has them)"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no FP8 "
                    "tensor cores (they start with 8.9: Ada, Hopper)")
        return None
    if device.type == "cpu":
        return None
    return f"torch has no FP8 matmul on {device.type}"
