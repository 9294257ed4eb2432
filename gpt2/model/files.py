"""Model files read as data, never run, and checked before any model is built.

A checkpoint of ours (checkpoint.pt) claims a shape in its `model_shape`, a Hugging Face GPT-2 folder in its
config.json. A broken or hostile file can claim anything: a few kilobytes that ask for 10,000 layers, a
pickle that runs a shell command. So, before a model is built:
- files are read as data only: safetensors, or torch.load(weights_only=True), which refuses pickled code;
- the claimed sizes are whole numbers in sane ranges, and n_head divides n_embd;
- every tensor of the claimed model is in the file, with its shape and a floating-point type, and nothing
  else is; and the tensors are backed by bytes of the file (torch can save a huge view of one number).
The model built then needs about as much memory as the file holds. Each problem is one ModelFileError that
names the file and what is wrong; the callers add the option the file came from.
"""

import json
import re
from pathlib import Path

import torch

from gpt2.model.gpt import GPT, PRESETS, GPTConfig

SIZE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
# far above any GPT-2 (48 layers, 25 heads, 1600 wide, 1024 positions, 50257 ids); what really bounds the
# memory is the check that the file holds tensors of these sizes
SIZE_LIMITS = {"n_layer": 1024, "n_head": 1024, "n_embd": 1 << 16, "block_size": 1 << 16, "vocab_size": 1 << 20}
TIED = {"lm_head.weight", "transformer.wte.weight", "wte.weight"}  # one matrix embeds tokens and scores them
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ModelFileError(ValueError):
    """A model file that cannot be used: the message names the file and what is wrong."""


def read_torch_file(path: Path):
    """torch.load(path, weights_only=True) on the CPU: tensors, dicts, lists and numbers, never code."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ModelFileError(f"{path} cannot be read ({e.strerror or e})") from None
    if size == 0:
        raise ModelFileError(f"{path} is corrupt or truncated: the file is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zips, bad pickles and refused globals raise many types
        raise ModelFileError(f"{path} {torch_load_problem(e)}") from None


def torch_load_problem(e: Exception) -> str:
    """What torch.load's exception means, in a few words (its own text advises weights_only=False: never)."""
    text = str(e)
    code = re.search(r"GLOBAL ([\w.]+)", text)
    if code:
        return (f"is corrupt or truncated, or holds more than tensors: it names {code.group(1)}, pickled code that "
                "was refused, so nothing in it ran (only tensors, dicts and numbers are loaded)")
    if "central directory" in text or "zip archive" in text:
        reason = "not a complete zip archive"
    elif "WeightsUnpickler error:" in text:
        reason = "unreadable pickle: " + text.split("WeightsUnpickler error:")[1].strip().splitlines()[0][:80]
    else:
        reason = f"{type(e).__name__}: {(text.strip().splitlines() or [''])[0][:80]}".rstrip(": ")
    return f"is corrupt or truncated, or not a torch.save file ({reason})"


def check_sizes(claimed, where: str, names: dict = None, defaults: dict = None) -> dict:
    """{n_layer, n_head, n_embd, block_size, vocab_size} as checked ints, from `claimed` (a checkpoint's
    model_shape, a config.json). names: our key -> the file's key; defaults: for keys the file may omit."""
    names, defaults = names or {}, defaults or {}
    if not isinstance(claimed, dict):
        raise ModelFileError(f"{where} is a {type(claimed).__name__}, not a dict of model sizes")
    missing = [names.get(k, k) for k in SIZE_KEYS if names.get(k, k) not in claimed and k not in defaults]
    if missing:
        raise ModelFileError(f"{where} lacks {', '.join(missing)}")
    sizes = {}
    for key in SIZE_KEYS:
        name = names.get(key, key)
        value = claimed.get(name, defaults.get(key))
        if type(value) is not int or not 1 <= value <= SIZE_LIMITS[key]:  # not bool, float, str or nested junk
            raise ModelFileError(f"{where}: {name}={value!r:.60} must be a whole number from 1 to "
                                 f"{SIZE_LIMITS[key]:,}")
        sizes[key] = value
    if sizes["n_embd"] % sizes["n_head"]:
        raise ModelFileError(f"{where}: {names.get('n_embd', 'n_embd')}={sizes['n_embd']} is not divisible by "
                             f"{names.get('n_head', 'n_head')}={sizes['n_head']}")
    return sizes


def expected_shapes(sizes: dict) -> dict:
    """{state_dict key: shape} of the GPT these sizes describe, built on the meta device: nothing allocated."""
    with torch.device("meta"):
        model = GPT(GPTConfig(**sizes, attention="flash"))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_tensors(shapes: dict, dtypes: dict, sizes: dict, file, source: str, hf: bool = False) -> None:
    """The file's tensors ({key: shape}, {key: dtype}) are exactly those of a GPT of `sizes` (transformers'
    layout if hf), of floating-point types; source says where the sizes came from (model_shape, config.json)."""
    blocks = _blocks(shapes)
    if blocks != sizes["n_layer"]:  # first: the expected shapes are only worked out for as many blocks as exist
        raise ModelFileError(f"{file} holds {blocks} block{'s' * (blocks != 1)} of weights (transformer.h.N), but "
                             f"{source} says n_layer={sizes['n_layer']}")
    expected = hf_shapes(sizes) if hf else expected_shapes(sizes)
    names = HF_NAMES if hf else {}
    claim = f"{source} (" + ", ".join(f"{names.get(k, k)}={v}" for k, v in sizes.items()) + ")"
    missing = sorted(expected.keys() - shapes.keys(), key=_natural)
    unexpected = sorted(shapes.keys() - expected.keys(), key=_natural)
    if missing or unexpected:
        raise ModelFileError(f"{file} is not a complete GPT-2 checkpoint (missing: {missing[:3] or 'none'}, "
                             f"unexpected: {unexpected[:3] or 'none'}) for {claim}")
    for key in sorted(expected, key=lambda k: (".h." in k, _natural(k))):  # wte and wpe first: they tell the sizes
        if tuple(shapes[key]) != expected[key]:
            raise ModelFileError(f"{file}: {key} has shape {tuple(shapes[key])}, but {claim} needs {expected[key]}")
        if dtypes[key] not in FLOAT_DTYPES:
            raise ModelFileError(f"{file}: {key} holds {dtypes[key]}, not floating-point weights")


def check_backed(tensors: dict, file) -> None:
    """Refuse tensors that claim more elements than the file's bytes hold: torch.save keeps a view as its
    storage, so a (50257, 1600) view of one float with strides (0, 0), or one block's weights seen as 48
    blocks, is a small file. Only the head may be the token table itself (tied weights)."""
    storages, views, claimed = {}, {}, 0
    for name, t in tensors.items():
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        view = (storage.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if view in views and {name, views[view]} <= TIED:
            continue
        views.setdefault(view, name)
        claimed += t.numel() * t.element_size()
    if claimed > sum(storages.values()):
        raise ModelFileError(f"{file}: its tensors claim {claimed:,} bytes but the file holds "
                             f"{sum(storages.values()):,} (views that repeat the same numbers): not the weights "
                             "of a saved model")


def checkpoint_sizes(state, file) -> dict:
    """The checked sizes of one of our checkpoints (a dict from read_torch_file), its weights checked too."""
    if not isinstance(state, dict) or "model" not in state or "model_shape" not in state:
        found = ", ".join(sorted(map(str, state))[:6]) if isinstance(state, dict) else type(state).__name__
        raise ModelFileError(f"{file} is not a gpt2-speedrun checkpoint (found {found or 'nothing'}, expected "
                             "'model' and 'model_shape')")
    sizes = check_sizes(state["model_shape"], f"{file}: model_shape")
    weights = state["model"]
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        what = type(weights).__name__ if not isinstance(weights, dict) else "entries that are not tensors"
        raise ModelFileError(f"{file}: 'model' holds {what}, not a dict of tensors")
    check_tensors({k: v.shape for k, v in weights.items()}, {k: v.dtype for k, v in weights.items()}, sizes, file,
                  "its model_shape")
    check_backed(weights, file)
    return sizes


# ---- Hugging Face GPT-2 folders ----------------------------------------------------------------------

HF_NAMES = {"block_size": "n_positions"}  # config.json's names for ours
HF_DEFAULTS = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "vocab_size": 50257}  # GPT2Config's
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal masks older files carry; ours are made, not loaded
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")  # preferred: the format holds no code
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


class HFWeights:
    """A Hugging Face GPT-2 folder whose config.json and tensors are checked: `sizes` as ours (block_size is
    n_positions), `nbytes` of weights, and tensors() yielding (key, tensor) with transformers' names and layout."""

    def __init__(self, folder: Path, shown: str):
        self.sizes = hf_sizes(folder, shown)
        files = weights_files(folder, shown)
        shapes, dtypes, self.where, self.loaded = {}, {}, {}, {}  # by our key; loaded: .bin files read whole
        for file in files:
            infos, self.loaded[file] = _tensor_infos(file)
            for key, (shape, dtype) in infos.items():
                if key == "lm_head.weight" or key.endswith(HF_BUFFERS):
                    continue  # the head is tied to wte
                ours = key if key.startswith("transformer.") else f"transformer.{key}"  # hub files leave it out
                if ours in shapes:
                    raise ModelFileError(f"{file}: {key} is in the checkpoint twice")
                shapes[ours], dtypes[ours], self.where[ours] = shape, dtype, (file, key)
        check_tensors(shapes, dtypes, self.sizes, files[0] if len(files) == 1 else shown, f"{shown}/config.json",
                      hf=True)
        self.nbytes = sum(_numel(s) * _itemsize(dtypes[k]) for k, s in shapes.items())

    def tensors(self):
        from safetensors import safe_open

        for file in dict.fromkeys(file for file, _ in self.where.values()):
            keys = [(ours, key) for ours, (f, key) in self.where.items() if f == file]
            if self.loaded[file] is not None:
                yield from ((ours, self.loaded[file][key]) for ours, key in keys)
                continue
            with safe_open(file, framework="pt") as f:  # one tensor at a time: the file is never all in memory
                yield from ((ours, f.get_tensor(key)) for ours, key in keys)


def hub_or_folder(name_or_path: str):
    """(folder, name to show): name_or_path if it is a folder, else the Hugging Face hub's files for it (gpt2
    ... gpt2-xl are openai-community's), downloaded once into the hub's cache; only config.json and the
    weights: safetensors when the hub has them."""
    folder = Path(name_or_path).expanduser()
    # "gpt2" run from this repository's root would be taken for our package folder: a GPT-2 name means the hub's
    # model unless a folder of that name holds a transformers checkpoint
    preset = name_or_path in PRESETS and name_or_path.startswith("gpt2")
    if folder.is_dir() and not (preset and not (folder / "config.json").is_file()):
        return folder, name_or_path
    if folder.is_file():
        raise ModelFileError(f"{name_or_path} is a file: a Hugging Face GPT-2 is a folder (config.json and "
                             f"{SAFETENSORS[0]}) or a hub name")
    repo = f"openai-community/{name_or_path}" if preset else name_or_path
    from huggingface_hub import snapshot_download

    try:
        for names in (SAFETENSORS, PICKLED):
            got = Path(snapshot_download(repo, allow_patterns=["config.json", *names, names[0].replace(".", "-*.")]))
            if any((got / name).is_file() for name in names):
                break
    except Exception as e:  # offline, no such repository, not a valid name: huggingface_hub raises many types
        raise OSError(f"{name_or_path} is no folder here, and the Hugging Face hub did not give {repo} "
                      f"({(str(e).strip().split('. ')[0].splitlines() or [type(e).__name__])[0][:200]})") from None
    return got, str(got)


def check_mask_memory(sizes: dict, weights_nbytes: int, where: str) -> None:
    """Explicit-mask attention keeps an n_positions x n_positions mask per layer: refuse when the masks would
    take more than the weights and 1 GiB more (a few weights claiming a long context); GPT-2 needs 12 MiB."""
    nbytes = sizes["n_layer"] * sizes["block_size"] ** 2
    if nbytes > weights_nbytes + (1 << 30):
        raise ModelFileError(f"{where}: n_positions={sizes['block_size']} over {sizes['n_layer']} layers needs "
                             f"{nbytes / (1 << 30):,.1f} GiB of causal masks with explicit-mask attention, far more "
                             "than its weights; use model.attention=flash")


def hf_sizes(folder: Path, shown: str) -> dict:
    """config.json's sizes, checked; keys it leaves out take GPT2Config's defaults, as in transformers."""
    path = folder / "config.json"
    if not path.is_file():
        ours = " (its checkpoint.pt is a run of this project: train.resume continues it)" \
            if (folder / "checkpoint.pt").is_file() else ""
        raise ModelFileError(f"{shown} has no config.json: not a model folder written by transformers{ours}")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{shown}/config.json is not readable JSON ({str(e)[:80]})") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{shown}/config.json holds a {type(config).__name__}, not a model configuration")
    model_type = config.get("model_type")
    if model_type != "gpt2":
        raise ModelFileError(f"{shown} holds a {model_type!s:.40} model, not GPT-2" if model_type else
                             f"{shown}/config.json names no model_type: not a GPT-2 written by transformers")
    return check_sizes(config, f"{shown}/config.json", HF_NAMES, HF_DEFAULTS)


def weights_files(folder: Path, shown: str) -> list:
    """model.safetensors when there is one (pytorch_model.bin beside it is never opened), else
    pytorch_model.bin; or the shards that their index names."""
    for single, index in (SAFETENSORS, PICKLED):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            return _shards(folder / index)
    raise ModelFileError(f"{shown} holds no weights: no {SAFETENSORS[0]} or {PICKLED[0]} (nor a sharded index)")


def hf_shapes(sizes: dict) -> dict:
    """The tensors a transformers GPT-2 of these sizes saves: ours, less the tied head, Conv1D transposed."""
    return {k: tuple(reversed(s)) if k.endswith(GPT._CONV1D) else s
            for k, s in expected_shapes(sizes).items() if k != "lm_head.weight"}


def _shards(index: Path) -> list:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ModelFileError(f"{index} is not a shard index (a JSON weight_map of tensor -> file)") from None
    for name in names:  # plain file names beside the index: never a path that leads elsewhere
        if not isinstance(name, str) or Path(name).name != name or name in (".", "..") \
                or not (index.parent / name).is_file():
            raise ModelFileError(f"{index} names {name!r:.80}, which is not a file beside it")
    return [index.parent / name for name in names]


def _tensor_infos(file: Path):
    """({key: (shape, dtype)} of one weights file, the tensors of a .bin file or None), building nothing."""
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(file, framework="pt") as f:  # reads the header, whose sizes it checks against the file
                slices = {k: f.get_slice(k) for k in f.keys()}
                return {k: (tuple(v.get_shape()), SAFETENSORS_DTYPES.get(v.get_dtype(), v.get_dtype()))
                        for k, v in slices.items()}, None
        except (SafetensorError, OSError) as e:
            raise ModelFileError(f"{file} is corrupt or truncated ({str(e).strip()[:120]})") from None
    state = read_torch_file(file)
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ModelFileError(f"{file} holds a {type(state).__name__} that is not only named tensors")
    check_backed(state, file)
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}, state


def _itemsize(dtype) -> int:
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 4


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _blocks(keys) -> int:
    return len({k.split(".")[2] for k in keys if k.startswith("transformer.h.") and k.count(".") > 2})


def _natural(key: str):
    """h.2 before h.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]
