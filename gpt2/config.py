"""The config schema: every key a run understands, with its default and why.

Registered in Hydra's ConfigStore as `config_schema` and named first in `conf/config.yaml`, so a typo
in a key or a value of the wrong type fails when the config is composed, with Hydra's own message,
whether it comes from the command line or from a YAML file. The defaults are the baseline stage;
`conf/stage/*.yaml` hold only what each stage changes.
"""

import math
import re
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from gpt2.architecture import GPT2_VOCAB_SIZE, PRESETS, Attention, Loss  # noqa: F401 (Attention, Loss: the schema's)
from gpt2.errors import UsageError


def option_str(option) -> str:
    """The plain string of a config enum (or of a string, as tests and plain OmegaConf nodes give)."""
    return str(getattr(option, "value", option))


def require(ok: bool, message: str) -> None:
    """The one way a check refuses: a one-line UsageError naming the key and the fix."""
    if not ok:
        raise UsageError(message)


def require_positive(section: str, values: dict) -> None:
    for key, v in values.items():
        require(v is None or v > 0, f"{section}.{key}={v} must be positive")


def require_not_negative(section: str, values: dict) -> None:
    for key, v in values.items():
        require(v is None or v >= 0, f"{section}.{key}={v} must not be negative")


class SdpaBackend(str, Enum):
    auto = "auto"  # torch's own order: FlashAttention-2, then memory-efficient, then math (cuDNN only when asked)
    cudnn = "cudnn"  # cuDNN's fused attention, Hopper-native kernels; as fast as FlashAttention-2 for GPT-2 124M
    #                  at B=64 on an H200 (1016 vs 1015 ms/step, experiments/h200-speedup), so not a stage
    flash = "flash"  # FlashAttention-2 only
    efficient = "efficient"  # the memory-efficient kernel only


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

    SIZE_KEYS = ("n_layer", "n_head", "n_embd", "block_size")

    def check(self) -> None:
        require(self.name in PRESETS, f"model.name={self.name} is not a preset: choose one of {', '.join(PRESETS)}")
        require_positive("model", {k: getattr(self, k) for k in (*self.SIZE_KEYS, "vocab_size")})
        if self.init_from != "scratch":
            explicit = [f"model.{k}={getattr(self, k)}" for k in self.SIZE_KEYS if getattr(self, k) is not None]
            require(not explicit, f"{', '.join(explicit)} cannot be combined with model.init_from={self.init_from}: "
                                  "the sizes come from those weights; leave them unset (model.vocab_size may pad)")
        require(self.vocab_size is None or self.vocab_size >= GPT2_VOCAB_SIZE,
                f"model.vocab_size={self.vocab_size} is smaller than the GPT-2 tokenizer's {GPT2_VOCAB_SIZE} ids: "
                f"use {GPT2_VOCAB_SIZE} or a padded size such as 50304")
        preset = dict(zip(self.SIZE_KEYS, PRESETS[self.name]))
        n_head, n_embd = self.n_head or preset["n_head"], self.n_embd or preset["n_embd"]
        require(n_embd % n_head == 0, f"model.n_head={n_head} does not divide model.n_embd={n_embd}: choose a "
                                      "number of heads that divides the width")

    def preset_overrides(self) -> dict:
        """What GPTConfig.from_preset(self.name, ...) takes: the sizes set explicitly, the implementations."""
        return dict(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, block_size=self.block_size,
                    vocab_size=self.vocab_size, attention=option_str(self.attention), loss=option_str(self.loss))


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

    def check(self) -> None:
        require(self.max_chars is None or self.max_chars > 0,
                f"data.max_chars={self.max_chars} must be positive (or null for the whole text)")
        self.check_val_fraction(self.val_fraction)
        cache = Path(str(self.cache_dir)).expanduser()
        require(not cache.exists() or cache.is_dir(), f"data.cache_dir={self.cache_dir} is a file, not a folder: "
                                                       "point it at a folder (it is created if missing)")

    @staticmethod
    def check_val_fraction(val_fraction: float) -> None:
        require(0 <= val_fraction < 1, f"data.val_fraction={val_fraction} must be in [0, 1)")


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

    def check(self) -> None:
        require(self.grad_clip is None or self.grad_clip > 0, f"optim.grad_clip={self.grad_clip} must be positive (a "
                "clip of 0 would zero every gradient; leave it null for no clipping)")
        require_not_negative("optim", {"warmup_steps": self.warmup_steps})
        require(math.isfinite(self.lr) and self.lr > 0, f"optim.lr={self.lr} must be a positive number (GPT-2 124M: "
                                                         "6e-4)")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                f"optim.betas={list(self.betas)} must be two numbers in [0, 1), e.g. optim.betas=[0.9,0.95]")
        require(math.isfinite(self.eps) and self.eps > 0, f"optim.eps={self.eps} must be a small positive number, "
                                                           "e.g. 1e-8")
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                f"optim.weight_decay={self.weight_decay} must be a number >= 0 (GPT-3: 0.1)")
        require(0 <= self.momentum < 1, f"optim.momentum={self.momentum} must be in [0, 1)")
        require(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1] (the cosine "
                                             "floor as a fraction of optim.lr; GPT-3: 0.1)")


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
    # Inductor options for torch.compile(model, options=...), e.g. {coordinate_descent_tuning: true}; names from
    # torch._inductor.list_options(), checked before the run; needs train.compile=true. Empty: Inductor's defaults
    compile_options: Dict[str, Any] = field(default_factory=dict)
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
    hellaswag_every: int = 0  # HellaSwag acc_norm every N steps and at the end (evaluation/hellaswag.py); 0 = never
    hellaswag_limit: Optional[int] = None  # the first N validation rows; null = all 10,042
    hellaswag_data: Optional[str] = None  # a local hellaswag_val.jsonl; null = download it once into the cache

    def check(self) -> None:
        require_positive("train", {k: getattr(self, k) for k in ("batch_size", "seq_len", "val_batches",
                                                                 "total_batch_size")})
        require_not_negative("train", {k: getattr(self, k) for k in ("steps", "timing_skip", "val_every",
                                                                     "checkpoint_every", "sample_every")})
        require(self.hellaswag_every >= 0, f"train.hellaswag_every={self.hellaswag_every} must not be negative (0: "
                                           "no HellaSwag)")
        require(self.hellaswag_limit is None or self.hellaswag_limit > 0,
                f"train.hellaswag_limit={self.hellaswag_limit} must be positive (or null for every row)")
        require(self.compile or not self.compile_options, f"train.compile_options={dict(self.compile_options)} are "
                "options of torch.compile: add train.compile=true, or leave them empty")


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

    def check(self) -> None:
        """Each section's own checks, in the order a reader meets the keys; what needs a device or the model's
        sizes is checked in gpt2/training/checks.py."""
        for section in (self.train, self.model, self.data, self.optim):
            section.check()


def typed(schema: type, node):
    """`node` (a composed DictConfig, a section of one, or a plain dict) as an instance of its schema dataclass,
    interpolations resolved and enums as members; an instance already is one. The one conversion a job makes, so
    that what runs reads attributes of checked dataclasses, not of the config tree."""
    if isinstance(node, schema):
        return node
    if OmegaConf.is_config(node):
        # the schema's keys only (a callback's config also holds `hydra`), each resolved where it sits: a section
        # may interpolate another (${data.cache_dir})
        node = {f.name: OmegaConf.to_container(node[f.name], resolve=True) if OmegaConf.is_config(node[f.name])
                else node[f.name] for f in fields(schema) if f.name in node}
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))


def as_config(cfg) -> Config:
    return typed(Config, cfg)


def plain(config: Config) -> dict:
    """The config as plain values (enums as their strings), as summary.json and wandb record it."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True, enum_to_str=True)


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
    from gpt2.distributed import shared_now

    ConfigStore.instance().store(name="config_schema", node=Config)
    OmegaConf.register_new_resolver("shared_now", shared_now, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("plain_name", plain_name, replace=True)
