"""The config schema: every key a run understands, with its default and why.

Registered in Hydra's ConfigStore as `config_schema` and named first in `conf/config.yaml`, so a typo
in a key or a value of the wrong type fails when the config is composed, with Hydra's own message,
whether it comes from the command line or from a YAML file. The defaults are the baseline stage;
`conf/stage/*.yaml` hold only what each stage changes.
"""

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from .errors import UsageError


def option_str(option) -> str:
    """The plain string of a config enum (or of a string, as tests and plain OmegaConf nodes give)."""
    return str(getattr(option, "value", option))


class Attention(str, Enum):
    manual = "manual"  # explicit causal mask + softmax, as in the GPT-2 paper
    flash = "flash"  # F.scaled_dot_product_attention(is_causal=True): FlashAttention kernels on GPU


class SdpaBackend(str, Enum):
    auto = "auto"  # torch's own order: FlashAttention-2, then memory-efficient, then math (cuDNN only when asked)
    cudnn = "cudnn"  # cuDNN's fused attention, Hopper-native kernels; as fast as FlashAttention-2 for GPT-2 124M
    #                  at B=64 on an H200 (1016 vs 1015 ms/step, experiments/h200-speedup), so not a stage
    flash = "flash"  # FlashAttention-2 only
    efficient = "efficient"  # the memory-efficient kernel only


class Loss(str, Enum):
    plain = "plain"  # lm_head logits (B*T, V), then cross-entropy: the textbook formulation
    fused = "fused"  # classifier + cross-entropy fused and chunked: the full logits never exist
    # fused, and the classifier's three matmuls (logits, grad input, grad weight) in FP8 with per-tensor dynamic
    # scales (e4m3 forward, e5m2 gradients; gpt2/fp8.py): twice the bf16 matmul rate on Ada/Hopper (sm89+)
    fused_fp8 = "fused_fp8"


class Device(str, Enum):
    auto = "auto"  # cuda > mps > cpu
    cuda = "cuda"
    mps = "mps"
    cpu = "cpu"


class MatmulPrecision(str, Enum):
    highest = "highest"  # true fp32 matmuls
    high = "high"  # TF32 tensor cores on Ampere and newer
    medium = "medium"  # bf16 internally where the backend allows


class ComputeDtype(str, Enum):
    fp32 = "fp32"  # no autocast
    bf16 = "bf16"  # torch.autocast(dtype=torch.bfloat16) around forward and loss


class OptimizerName(str, Enum):
    adamw = "adamw"
    sgd = "sgd"


class Schedule(str, Enum):
    constant = "constant"
    cosine = "cosine"  # linear warm-up, cosine decay to a floor (GPT-3)


class DDPBackend(str, Enum):
    auto = "auto"  # nccl on cuda, gloo on cpu
    nccl = "nccl"
    gloo = "gloo"


class WandbMode(str, Enum):
    disabled = "disabled"
    offline = "offline"
    online = "online"


@dataclass
class StageConfig:
    name: str = "baseline"
    adds: str = "fp32, explicit causal-mask attention, vocab 50257, AdamW(lr=3e-4) defaults, constant LR"


@dataclass
class ModelConfig:
    name: str = "gpt2"  # preset: gpt2 (124M), gpt2-medium, gpt2-large, gpt2-xl, tiny
    # null means "the preset's value"; set any of them to change one dimension of the preset
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    block_size: Optional[int] = None  # context length the position table covers (1024 for GPT-2)
    vocab_size: Optional[int] = None  # 50257 for GPT-2; 50304 pads it to a multiple of 128
    attention: Attention = Attention.manual
    loss: Loss = Loss.plain
    init_from: str = "scratch"  # or a Hugging Face name (gpt2, ...) or a folder written by transformers


@dataclass
class DataConfig:
    name: str = "tiny_shakespeare"
    url: str = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    sha256: Optional[str] = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    path: Optional[str] = None  # a local text file to use instead of downloading
    cache_dir: str = "${oc.env:GPT2_SPEEDRUN_CACHE,'~/.cache/gpt2-speedrun'}"
    max_chars: Optional[int] = None  # keep only the first N characters (smoke-test data sets)
    val_fraction: float = 0.1  # the last 10% of tokens are held out for validation
    # a folder of uint16 .npy token shards ({prefix}_val_000000.npy, {prefix}_train_000001.npy, ...) as
    # `python -m gpt2.prepare` and build-nanogpt's fineweb.py write them; set, it replaces the text above
    shards_dir: Optional[str] = None
    shards_prefix: str = "edufineweb"


@dataclass
class OptimConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 3e-4  # the peak when a schedule is on
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # torch's defaults
    eps: float = 1e-8
    weight_decay: float = 0.01  # torch AdamW's default, applied to every parameter
    decay_2d_only: bool = False  # GPT-3: decay matrices and embeddings, never biases or LayerNorm gains
    fused: bool = False  # the fused AdamW kernel, where the device supports it
    momentum: float = 0.0  # SGD only
    schedule: Schedule = Schedule.constant
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of the peak
    grad_clip: Optional[float] = None  # clip the global grad norm to this value


@dataclass
class TrainConfig:
    device: Device = Device.auto
    seed: int = 1337
    steps: int = 50  # optimizer steps; 0 only evaluates
    batch_size: int = 16  # B, sequences per micro-batch per process
    seq_len: Optional[int] = None  # T; null = the model's context (1024 for GPT-2)
    total_batch_size: Optional[int] = None  # tokens per optimizer step; null = B * T * world size
    matmul_precision: MatmulPrecision = MatmulPrecision.highest
    autocast_dtype: ComputeDtype = ComputeDtype.fp32
    compile: bool = False
    # which fused kernel scaled_dot_product_attention may use on CUDA (model.attention=flash); math stays on as
    # the fallback for inputs the kernel cannot take. CPU and MPS have one kernel each: no effect there
    sdpa_backend: SdpaBackend = SdpaBackend.auto
    timing_skip: int = 3  # first steps (allocator, autotuning, compilation) left out of ms/step
    val_every: int = 250  # validation loss every N steps (build-nanogpt's cadence) and at the end; 0 = end only
    val_batches: int = 4  # micro-batches per validation
    checkpoint_every: int = 0  # 0 = none on the way; a single run (not a sweep's job) still saves its last step
    save_checkpoints: bool = True  # false: never write checkpoint.pt, not even on a signal (benchmarks)
    # a checkpoint file or a run folder to continue (into this run's new folder); `auto`: continue the run of this
    # run's own fixed folder (hydra.run.dir=DIR) from its checkpoint, or start it there when it has none, so that
    # a requeued or restarted job is the same command (a finished run there is left as it is)
    resume: Optional[str] = None
    ddp_backend: DDPBackend = DDPBackend.auto
    sample_every: int = 0  # text samples every N steps from the main process (build-nanogpt: 250); 0 = never
    sample_prompt: str = "Hello, I'm a language model,"  # the prompt they continue (4 samples, 32 tokens, top-k 50)
    hellaswag_every: int = 0  # HellaSwag acc_norm every N steps and at the end (gpt2/hellaswag.py); 0 = never
    hellaswag_limit: Optional[int] = None  # the first N validation rows; null = all 10,042
    hellaswag_data: Optional[str] = None  # a local hellaswag_val.jsonl; null = download it once into the cache


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.disabled
    project: str = "gpt2-speedrun"
    entity: Optional[str] = None
    name: Optional[str] = None


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class SweepConfig:
    # value overrides applied to one stage of a sweep, e.g. {"grad-accum": ["train.total_batch_size=8192"]}:
    # lets a CPU-sized sweep scale the one stage whose setting does not fit a small machine
    stage_overrides: Dict[str, List[str]] = field(default_factory=dict)


@dataclass
class Config:
    stage: StageConfig = field(default_factory=StageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def plain_name(name: str) -> str:
    """A stage name as it goes into a folder name: letters, digits, '-', '_', '.', never a path."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", str(name)):
        raise UsageError(f"stage.name={name!r} is not a plain name: use letters, digits, '-', '_' and '.' (it names "
                         "the run's folder)")
    return str(name)


def check_command_line(args: list) -> None:
    """What must be refused before Hydra starts: a stage name that would make a folder outside outputs/."""
    for arg in args:
        key, _, given = arg.lstrip("+~").partition("=")
        if key == "stage.name":
            for name in given.split(","):  # a sweep over names: a,b,c
                plain_name(name.strip().strip("'\""))


def register_configs() -> None:
    """The schema and the resolvers conf/config.yaml uses. Torch-free (as is gpt2.distributed), so that
    `run.py --help`, `--cfg` and TAB completion compose the config without loading torch."""
    from .distributed import shared_now

    ConfigStore.instance().store(name="config_schema", node=Config)
    OmegaConf.register_new_resolver("shared_now", shared_now, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("plain_name", plain_name, replace=True)
