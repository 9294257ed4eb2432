"""Classifier + cross-entropy in one pass, a chunk of rows at a time: the (N, V) logits never exist whole.

GPT-2's head turns N = B*T hidden states (N, C) into (N, V) logits with V = 50257 (or 50304), and the
cross-entropy then keeps a full-size fp32 log-softmax for backward and makes more (N, V) buffers in backward.
At B=16, T=1024 the fp32 logits alone are 3.3 GB, and everything of their size dominates the step's memory.

`FusedLinearCrossEntropy` (the design of Liger-Kernel's FusedLinearCrossEntropy, in plain torch) computes,
per chunk of rows, the logits x_chunk @ W.T, their log-softmax in fp32, the chunk's share of the loss, and at
once the gradients: dlogits = (softmax - onehot(target)) / n_valid, grad_x_chunk = dlogits @ W and
grad_W += dlogits.T @ x_chunk (accumulated in place across chunks). Forward keeps only grad_x (N, C) and
grad_W (V, C); backward just scales them by the incoming gradient. Peak memory is one chunk of logits.
Where no gradient is wanted (torch.no_grad, as in validation), `chunked_loss` makes the loss alone: one matmul
per chunk instead of three (the FP8 head keeps its one path).

Numbers: the mean over targets != ignore_index of -log softmax(x @ W.T)[target], as
F.cross_entropy(F.linear(x, W).float(), targets), in fp32 whatever the inputs' dtype. Under autocast
the three matmuls run in the autocast dtype (as autocast runs lm_head), the softmax and the loss in fp32;
grad_x comes back in x's dtype and grad_W in W's dtype (the fp32 master weight), summed over chunks in
that dtype. Plain torch ops in a Python loop: eager on any device, and traced by torch.compile
(fullgraph=True) with the loop unrolled; each chunk is written two ways, one for eager (fused log_softmax,
the gradient made in place in its buffer) and one for the compiler (pointwise ops and reductions it fuses),
the same numbers to rounding.

Weight tying: grad_W is a fresh contiguous buffer that nobody else holds, so autograd adds the token
embedding's gradient into it in place and hands it to the tied parameter as its .grad (no extra (V, C) sum).

Plain torch rather than Liger-Kernel itself: Liger's Triton kernel needs a GPU (the CPU suite and CPU runs use
this too), and on an H200 it measured 1.2x slower than the compiled plain head (README, "On a GPU"); this one
traces under torch.compile with the rest of the model.

One mechanism for CPU and GPU: this function replaced the CPU-only, eager-only ChunkedCrossEntropy and
TiedWeight that gpt2/model/gpt.py carried for the plain loss. Full CPU training steps (fp32, AdamW, 2-core CPU of
experiments/cpu_vs_transformers, medians of 8 clean alternating rounds, ratio to transformers' fastest
GPT2LMHeadModel in the same rounds): gpt2 B=4 T=128: textbook plain 0.986, old lean path 0.930, this 0.940;
4x4x256 B=8 T=256: plain 0.994, lean 0.863, this 0.878. The plain loss is now the textbook one everywhere.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from gpt2.model.fp8 import ALIGNMENT, E5M2, column_major, fp8_mm, to_fp8

# Elements per chunk of logits: 2^27, i.e. 2624 rows at V=50304 (rows rounded down to a multiple of 64 so
# each chunk's matmuls fill whole tensor-core tiles): 264 MB of bf16 logits (528 MB in fp32) per chunk, where
# the plain head at B=16, T=1024 makes 1.6 GB of bf16 logits and 3.3 GB of fp32 log-probabilities. Larger
# chunks are faster on both devices: each chunk's matmuls stream the whole (V, C) weight, and grad_W (V, C, fp32)
# is read and written once per chunk. Measured (lm_head + loss, forward + backward, C=768, medians):
#   H100, torch 2.11, bf16 autocast, torch.compile, N=16384, V=50304: chunks of 1280 / 2624 rows 10.7 / 10.2 ms
#   in the eager-friendly formulation, 9.6 / 8.5 ms in the pointwise one used under compile (below);
#   plain F.linear + F.cross_entropy compiled 7.9 ms. Eager: 640 / 1280 / 2624 rows 26.1 / 22.7 / 20.9 ms,
#   plain 19.4 ms (peak memory +0.67 / 1.15 / 2.16 GiB, plain +9.2 GiB).
#   2-core CPU of experiments/cpu_vs_transformers, fp32 eager, N=2048, V=50257: chunks of 2^24 / 2^25 / 2^26 /
#   2^27 elements 2728 / 2730 / 2646 / 2604 ms, plain 2818 ms; at N=512, 20-row chunks took 1289 ms, one chunk 699.
CHUNK_ELEMENTS = 2**27


def chunk_rows_for(vocab_size: int) -> int:
    """Rows per chunk: as many as keep one chunk of logits within CHUNK_ELEMENTS (at least one), a multiple
    of 64 when there are more than 64. The same on every device (see CHUNK_ELEMENTS)."""
    rows = max(1, CHUNK_ELEMENTS // vocab_size)
    return rows - rows % 64 if rows > 64 else rows


def chunk_loss_and_dlogits(logits: torch.Tensor, target: torch.Tensor, s: torch.Tensor):
    """One chunk's share of the loss (fp32 scalar) and d loss / d logits (r, V) in fp32: (softmax - onehot) * s,
    s (r, 1) being each row's weight in the mean."""
    if torch.compiler.is_compiling():
        # pointwise and reductions over the chunk, which the compiler fuses into a few kernels;
        # the target's logit as a masked sum (a gather is scheduled late, keeping logits alive)
        z = logits.float()
        lse = z.logsumexp(-1, keepdim=True)
        onehot = torch.arange(z.size(1), device=z.device) == target
        return ((lse - (z * onehot).sum(-1, keepdim=True)) * s).sum(), ((z - lse).exp() - onehot.float()) * s
    # eager: fused log_softmax, then its buffer turned into the gradient in place (no more (r, V) buffers,
    # which on a CPU would be fresh memory paid in page faults)
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    chunk_loss = -(logp.gather(1, target) * s).sum()
    dlogits = logp.exp_()  # softmax, in place
    dlogits.scatter_add_(1, target, torch.full_like(s, -1.0))  # - onehot(target)
    return chunk_loss, dlogits.mul_(s)


def chunked_loss(x, weight, targets, ignore_index: int, chunk_rows: int, compute_dtype: torch.dtype) -> torch.Tensor:
    """FusedLinearCrossEntropy's loss where no gradient is wanted (torch.no_grad: validation): one matmul per
    chunk instead of three, and no (N, C) or (V, C) gradient buffers. The same matmul dtype and fp32 loss."""
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    with torch.autocast(x.device.type, enabled=False):
        xs, w = x.to(compute_dtype), weight.to(compute_dtype)
        for start in range(0, x.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            total = total + F.cross_entropy((xs[rows] @ w.t()).float(), targets[rows], ignore_index=ignore_index,
                                            reduction="sum")
    return total / (targets != ignore_index).sum()  # 0/0 = nan when every target is ignored, as F.cross_entropy


class FusedLinearCrossEntropy(torch.autograd.Function):
    """loss = mean over valid rows of cross_entropy(x @ weight.T, targets); gradients computed in forward."""

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index: int, chunk_rows: int, compute_dtype: torch.dtype):
        n = x.size(0)
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)  # any real id: ignored rows are scaled by 0 below
        # each row's weight in the mean: 1/n_valid, 0 when ignored (0/0 = nan when every target is ignored,
        # as F.cross_entropy gives)
        scale = (valid.float() / valid.sum())[:, None]
        with torch.autocast(x.device.type, enabled=False):  # dtypes chosen here, explicitly
            xs, w = x.to(compute_dtype), weight.to(compute_dtype)  # no copy when already in that dtype
            grad_x = torch.empty_like(x)
            grad_w = None
            loss = torch.zeros((), dtype=torch.float32, device=x.device)
            for start in range(0, n, chunk_rows):
                rows = slice(start, start + chunk_rows)
                x_chunk, target, s = xs[rows], safe_targets[rows, None], scale[rows]
                logits = x_chunk @ w.t()  # (r, V) in the matmul dtype
                chunk_loss, dlogits = chunk_loss_and_dlogits(logits, target, s)
                loss = loss + chunk_loss
                dlogits = dlogits.to(compute_dtype)
                grad_x[rows] = dlogits @ w  # cast to x's dtype
                if grad_w is None:  # the first chunk's product is the buffer (no zero-filled one to add into)
                    grad_w = (dlogits.t() @ x_chunk).to(weight.dtype)
                elif grad_w.dtype == compute_dtype:
                    grad_w.addmm_(dlogits.t(), x_chunk)  # in place: no (V, C) temporary
                else:
                    grad_w.add_(dlogits.t() @ x_chunk)  # bf16 product, summed in fp32
        ctx.save_for_backward(grad_x, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        # scaled in place: the buffers were made for this, and a fresh (V, C) one would cost memory (and,
        # on a CPU, page faults). A second backward through the same graph is refused by autograd's
        # version check, as for any saved tensor modified in place.
        return grad_x.mul_(grad_loss), grad_w.mul_(grad_loss), None, None, None, None


class FP8LinearCrossEntropy(FusedLinearCrossEntropy):
    """FusedLinearCrossEntropy with its three matmuls in FP8 (gpt2/model/fp8.py): logits = x8 @ w8.T (e4m3 x e4m3),
    grad_x = g8 @ w8 and grad_W += g8.T @ x8 (e5m2 x e4m3), each product in the compute dtype; the softmax,
    the loss and the sums over chunks as in the parent, whose backward (scaling the saved gradients) this is."""

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index: int, chunk_rows: int, compute_dtype: torch.dtype):
        n = x.size(0)
        pad = -n % ALIGNMENT  # rows are K of the grad_W matmul: zero rows with ignored targets count for nothing
        xs = F.pad(x, (0, 0, 0, pad)) if pad else x
        targets = F.pad(targets, (0, pad), value=ignore_index) if pad else targets
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        n_valid = valid.sum().float()
        scale = (valid.float() / n_valid)[:, None]
        grad_max = torch.finfo(E5M2).max
        with torch.autocast(x.device.type, enabled=False):
            x8, x_inv = to_fp8(xs)  # (N, C) e4m3, one scale for all rows
            w8, w_inv = to_fp8(weight)  # (V, C) e4m3
            w8_k_major = column_major(w8)  # (V, C) with V contiguous: K of the grad_x matmul
            # d loss / d logits = (softmax - onehot) / n_valid lies within [-1, 1] / n_valid: that bound is the
            # gradient's scale (e5m2's largest number at 1/n_valid), which spares a pass over each chunk for amax
            grad_scale = grad_max * n_valid
            grad_inv = grad_scale.reciprocal()
            grad_x = torch.empty_like(xs)
            grad_w = None
            loss = torch.zeros((), dtype=torch.float32, device=x.device)
            for start in range(0, n + pad, chunk_rows):
                rows = slice(start, start + chunk_rows)
                x8_chunk = x8[rows]
                logits = fp8_mm(x8_chunk, x_inv, w8.t(), w_inv, compute_dtype, fast_accum=True)  # (r, V)
                chunk_loss, dlogits = chunk_loss_and_dlogits(logits, safe_targets[rows, None], scale[rows])
                loss = loss + chunk_loss
                g8 = (dlogits * grad_scale).clamp(-grad_max, grad_max).to(E5M2)
                grad_x[rows] = fp8_mm(g8, grad_inv, w8_k_major, w_inv, compute_dtype)  # cast to x's dtype
                # K = the chunk's rows: both operands row-contiguous, g8 transposed (a copy of one chunk)
                grad_w_chunk = fp8_mm(g8.t().contiguous(), grad_inv, column_major(x8_chunk), x_inv, compute_dtype)
                grad_w = grad_w_chunk.to(weight.dtype) if grad_w is None else grad_w.add_(grad_w_chunk)
        ctx.save_for_backward(grad_x[:n], grad_w)
        return loss


def fused_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100, chunk_rows: Optional[int] = None,
                               fp8: bool = False) -> torch.Tensor:
    """Mean cross-entropy (fp32) of the logits x @ weight.T against targets, without the (N, V) logits.

    x: (N, C) hidden states, weight: (V, C) classifier (lm_head's, tied to the token table), targets: (N,)
    int64 with ignore_index for rows that do not count. Same value and gradients as
    F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=ignore_index); under autocast the
    matmuls run in the autocast dtype, as autocast would run F.linear. fp8: the three matmuls in FP8 with
    dynamic per-tensor scales instead (FP8LinearCrossEntropy; vocabulary and width multiples of 16).
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(x.dtype, weight.dtype)
    rows = chunk_rows or chunk_rows_for(weight.size(0))
    if not fp8:
        if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            return chunked_loss(x, weight, targets, ignore_index, rows, compute_dtype)  # validation: no gradients
        return FusedLinearCrossEntropy.apply(x, weight, targets, ignore_index, rows, compute_dtype)
    if weight.size(0) % ALIGNMENT or weight.size(1) % ALIGNMENT:
        raise ValueError(f"FP8 matmuls need the vocabulary ({weight.size(0)}) and the width ({weight.size(1)}) "
                         f"to be multiples of {ALIGNMENT}: pad the vocabulary (50304) or use fp8=False")
    rows = -(-rows // ALIGNMENT) * ALIGNMENT  # each chunk's rows are K of its grad_W matmul
    return FP8LinearCrossEntropy.apply(x, weight, targets, ignore_index, rows, compute_dtype)
