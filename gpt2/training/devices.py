"""The device a run uses and torch's global state: which device, every global flag set per job, and whether
torch.compile can build kernels on this machine."""

import gc
import os
import shutil
import sys
import sysconfig
from pathlib import Path

import torch

from gpt2 import distributed
from gpt2.training import metrics
from gpt2.config import option_str as value
from gpt2.errors import UsageError


def pick_device(requested: str, option: str = "train.device") -> torch.device:
    """The device `requested` names ("auto": cuda, else mps, else cpu), refused in one line naming `option`
    (train.device, or a command's --device) when this machine or this torch build has none. Every command
    chooses its device here, so they agree."""
    def setting(name):
        return f"{option} {name}" if option.startswith("--") else f"{option}={name}"

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{setting('cuda')}, but torch sees no CUDA device: use {setting('cpu')} (or auto), or "
                         "install a CUDA build of torch on a machine with a GPU")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{setting('mps')}, but this torch has no MPS device: use {setting('cpu')} or auto")
    return torch.device(requested)


def resolve_device(requested: str, ranks: distributed.Ranks) -> torch.device:
    """The run's device: pick_device's, and under torchrun the GPU of this rank (made the current one)."""
    device = pick_device(requested)
    if device.type == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise UsageError(f"local rank {ranks.local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                             "lower torchrun's --nproc_per_node to the number of GPUs")
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    return device


def configure_torch(train_cfg, device: torch.device) -> None:
    """Set every global flag this run depends on (the run's `train` section): a multirun's earlier job must leave
    nothing behind."""
    # native bf16 needs compute capability 8.0 (Ampere); torch.cuda.is_bf16_supported() also counts emulation
    if value(train_cfg.autocast_dtype) == "bf16" and device.type == "cuda" \
            and torch.cuda.get_device_capability(device)[0] < 8:
        raise UsageError(f"train.autocast_dtype=bf16, but {torch.cuda.get_device_name(device)} has no bf16 "
                         "support: use train.autocast_dtype=fp32 (stages before bf16), or a newer GPU")
    dynamo = sys.modules.get("torch._dynamo")  # torch.compile imports it; importing it here would cost ~1 s
    if dynamo is not None:
        dynamo.reset()  # compiled graphs and guards of the previous job
    gc.collect()  # the previous job's model and optimizer, which reference cycles keep alive
    # what survived is the process's own (modules, Hydra's objects): frozen, the next job's collection skips
    # it. A full collection scans ~300k objects once torch._dynamo is imported: 0.3-0.4 s on a busy 2-core
    # machine, paid by every job of a sweep
    gc.freeze()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    precision = value(train_cfg.matmul_precision)
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = precision != "highest"
    set_sdpa_backends(value(train_cfg.sdpa_backend) if device.type == "cuda" else "auto")
    torch.manual_seed(train_cfg.seed)  # also seeds every CUDA device
    metrics.reset_peak_memory(device)


_sdp = torch.backends.cuda
SDPA_SWITCHES = {"flash": _sdp.enable_flash_sdp, "efficient": _sdp.enable_mem_efficient_sdp,
                 "cudnn": _sdp.enable_cudnn_sdp, "math": _sdp.enable_math_sdp}
SDPA_STATES = {"flash": _sdp.flash_sdp_enabled, "efficient": _sdp.mem_efficient_sdp_enabled,
               "cudnn": _sdp.cudnn_sdp_enabled, "math": _sdp.math_sdp_enabled}


def set_sdpa_backends(choice: str) -> None:
    """Which CUDA kernels scaled_dot_product_attention may pick (train.sdpa_backend). These switches are
    process-wide, so every job sets all four. 'auto' enables them all and leaves the order to torch, which
    tries cuDNN last; a named kernel is enabled alone with math as the fallback for inputs it cannot take."""
    enable_sdpa_backends(SDPA_SWITCHES if choice == "auto" else (choice, "math"))


def enable_sdpa_backends(names) -> None:
    """Exactly these SDPA kernels on, every other off (names as enabled_sdpa_backends() lists them)."""
    for name, switch in SDPA_SWITCHES.items():
        switch(name in names)


def enabled_sdpa_backends() -> list:
    return [name for name, state in SDPA_STATES.items() if state()]


def check_compiler(device: torch.device) -> None:
    """torch.compile writes C (Triton's launcher on CUDA) or C++ (Inductor's CPU kernels) and builds it with
    the machine's compiler against Python's headers; without them it fails deep inside Triton or Inductor."""
    needed = "C compiler (cc, gcc or clang)" if device.type == "cuda" else "C++ compiler (g++ or clang++)"
    names = ("cc", "gcc", "clang") if device.type == "cuda" else ("c++", "g++", "clang++")
    env_var = "CC" if device.type == "cuda" else "CXX"
    if not (os.environ.get(env_var) or any(shutil.which(n) for n in names)):
        raise UsageError(f"train.compile=true needs a {needed} on this machine, and none was found: install one "
                         "(e.g. apt install build-essential) or run a stage without torch.compile "
                         "(train.compile=false)")
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.is_file():
        raise UsageError(f"train.compile=true needs Python's C headers ({headers} is missing): install them (e.g. "
                         "apt install python3-dev) or run a stage without torch.compile (train.compile=false)")
