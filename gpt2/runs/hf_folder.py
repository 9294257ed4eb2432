"""A run's model as a complete Hugging Face folder: weights, config, generation settings, tokenizer, model card.

`python -m gpt2.hf_export` (gpt2/hf_export.py) and `python -m gpt2.evaluate harness` write it with export().

The folder loads with AutoModelForCausalLM / AutoTokenizer / pipeline("text-generation") and nothing else:
- model.safetensors and config.json: GPT.save_hf (a GPT2LMHeadModel). A padded table (50304 rows in the
  nice-vocab stage) is cut back to the tokenizer's 50257 ids, as Hugging Face's GPT-2 has them: the padded ids
  are never produced by the tokenizer, and the logits of the real ones are unchanged.
- generation_config.json: <|endoftext|> (50256) as bos, eos and pad, max_length the model's context.
- the tokenizer, built offline from tiktoken's ranks (gpt2/tokenizer.py): vocab.json and merges.txt in GPT-2's
  own format, and a GPT2TokenizerFast saved by transformers (tokenizer.json, tokenizer_config.json).
- README.md: a model card with the run's figures from its summary.json.
The folder is written beside `out` under a temporary name and renamed at the end: an interrupted export leaves
no half folder, and an existing non-empty `out` is refused unless force is given.
"""

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

from gpt2.errors import UsageError
from gpt2.runs.loading import load_model
from gpt2.tokenizer import EOT, get_tokenizer

TOKENS = "<|endoftext|>"
NOT_RECORDED = "not recorded"
# model.init_from values that are OpenAI's GPT-2 on the hub (MIT licensed); a run from scratch has no licence
# of its own until its owner gives one
OPENAI_GPT2 = {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}


# ---- the tokenizer ------------------------------------------------------------------------------------

def _split(ranks: dict, token: bytes, rank: int) -> list:
    """The two tokens whose merge made `token`: byte-pair encoding of its bytes with only the merges ranked
    below its own (each step joins the lowest-ranked adjacent pair), which stops at exactly two parts."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            return parts
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


@functools.lru_cache(maxsize=1)
def vocab_and_merges() -> tuple:
    """({token: id} with <|endoftext|>, [(left, right), ...] in rank order) from tiktoken's ranks (~1.5 s)."""
    # GPT-2's printable stand-in for each byte (its encoder.py's function, as transformers keeps it)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = get_tokenizer()._mergeable_ranks  # bytes -> id; tiktoken keeps the merges only implicitly
    to_text = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_text[b] for b in token)

    vocab, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        vocab[text(token)] = rank
        if len(token) > 1:
            parts = _split(ranks, token, rank)
            assert len(parts) == 2, f"token {rank} is not the merge of two earlier tokens: {parts}"
            merges.append((text(parts[0]), text(parts[1])))
    vocab[TOKENS] = EOT
    return vocab, merges


def save_tokenizer(folder: Path, max_length: int = 1024) -> None:
    """GPT-2's vocab.json and merges.txt, and the GPT2TokenizerFast made from them as transformers saves it;
    max_length: the model's context, which pipelines truncate prompts to."""
    from transformers import GPT2TokenizerFast

    vocab, merges = vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    tokenizer = GPT2TokenizerFast(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)
    tokenizer.save_pretrained(folder)


# ---- the model card -----------------------------------------------------------------------------------

def read_summary(info: dict):
    """The run's summary.json as a dict, or None (a bare model file, a Hugging Face model, an unreadable file)."""
    run = info.get("run_folder")
    try:
        summary = json.loads((Path(run) / "summary.json").read_text()) if run else None
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _figure(value, fmt: str = "{}") -> str:
    return NOT_RECORDED if value is None else fmt.format(value)


def _figures(summary: dict, info: dict) -> list:
    """(label, text) of each figure the card states, "not recorded" where the summary lacks it."""
    steps, per_step = summary.get("steps"), summary.get("tokens_per_step")
    tokens = steps * per_step if isinstance(steps, int) and isinstance(per_step, int) else None
    hellaswag = None
    if summary.get("hellaswag_acc_norm") is not None:
        hellaswag = (f"acc_norm {summary['hellaswag_acc_norm']:.4f}, acc {summary.get('hellaswag_acc', 0):.4f} on "
                     f"{summary.get('hellaswag_n', '?')} rows (build-nanogpt scoring, during training)")
    hardware = None
    if summary.get("device"):
        world = summary.get("world_size") or 1
        hardware = f"{world} x {summary['device']}" if world > 1 else str(summary["device"])
        if summary.get("torch_version"):
            hardware += f", torch {summary['torch_version']}"
    return [("Stage", _figure(summary.get("stage") or info.get("stage"))),
            ("What the stage adds", _figure(summary.get("adds"))),
            ("Status", _figure(summary.get("status"))),
            ("Steps", _figure(steps, "{:,}")),
            ("Tokens seen", _figure(tokens, "{:,}")),
            ("Final validation loss", _figure(summary.get("val_loss"), "{:.4f}")),
            ("HellaSwag", _figure(hellaswag)),
            ("Hardware", _figure(hardware)),
            ("Command", _figure(summary.get("command"), "`{}`"))]


def model_card(config, info: dict, summary, repo_id: str = None) -> str:
    """README.md: YAML front matter for the hub, then what the model is (config: its GPTConfig) and the run's
    figures (summary: its summary.json, None when there is none)."""
    init_from = ((summary or {}).get("config") or {}).get("model", {}).get("init_from")
    front = {"library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["gpt2", "text-generation", "gpt2-speedrun"]}
    if init_from in OPENAI_GPT2:  # fine-tuned from OpenAI's weights: their licence and base model
        front.update(license="mit", base_model=f"openai-community/{init_from}")
    # JSON strings and lists are YAML: no YAML library needed to write the front matter exactly
    lines = ["---", *(f"{k}: {json.dumps(v)}" for k, v in front.items()), "---", ""]
    lines += [f"# {repo_id or 'GPT-2'} (gpt2-speedrun)", "",
              f"A GPT-2 of {config.n_layer} layers, {config.n_head} heads, width {config.n_embd} and a context of "
              f"{config.block_size} tokens, trained with gpt2-speedrun, exported from `{Path(info['source']).name}`.",
              ""]
    if summary is None:
        lines += [f"Exported from a bare model file ({info.get('kind')}) without its run's summary.json: the "
                  f"run's figures are {NOT_RECORDED}.", ""]
    lines += ["| | |", "| --- | --- |"]
    lines += [f"| {label} | {text} |" for label, text in _figures(summary or {}, info)]
    lines += ["", "## Use", "", "```python", "from transformers import pipeline",
              f"generate = pipeline(\"text-generation\", model=\"{repo_id or 'PATH/TO/THIS/FOLDER'}\")",
              "print(generate(\"Hello, I'm a language model,\", max_new_tokens=30)[0][\"generated_text\"])",
              "```", "", "The tokenizer is GPT-2's (50257 ids, `<|endoftext|>` = 50256).", ""]
    return "\n".join(lines)


# ---- the folder ---------------------------------------------------------------------------------------

def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder: give a folder name")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"--out {out} exists and is not empty: nothing was written; pass --force to replace it, "
                         f"or give another folder")


def _write(model, info: dict, folder: Path, repo_id=None) -> None:
    from transformers import GenerationConfig

    model.save_hf(folder)
    # bos, eos and pad all <|endoftext|>, as GPT-2 was trained (pad given: generate() need not warn and pick it).
    # No max_length: transformers' default (20 new tokens, capped at n_positions) already keeps to the context,
    # and a max_length here makes every call with max_new_tokens warn that both are set
    GenerationConfig(bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT).save_pretrained(folder)
    save_tokenizer(folder, model.config.block_size)
    (folder / "README.md").write_text(model_card(model.config, info, read_summary(info), repo_id), encoding="utf-8")
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.iterdir()]:  # mkdtemp's folder and transformers' weights are private: readable
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def export_model(model, info: dict, out, force: bool = False, repo_id=None) -> Path:
    """Write the Hugging Face folder of a loaded model (load_model's model and info) to `out`; returns it.
    Refuses a non-empty `out` unless force; nothing is changed until the new folder is whole. repo_id: the hub
    repository the card names (else it names no place)."""
    out = Path(out).expanduser()
    _check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        _write(model, info, tmp, repo_id)
        if out.exists():
            if any(out.iterdir()):  # force: the old folder moves aside and goes only once the new one is in place
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
            else:
                out.rmdir()
        os.replace(tmp, out)
    finally:
        if old is not None and not out.exists():  # stopped between the two renames: the old folder goes back
            os.replace(old, out)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def export(init, out, force: bool = False, repo_id=None) -> Path:
    """export_model of `init`, a run folder or a model file loaded as gpt2.sample loads it (or a transformers
    GPT-2). `out` is checked before the model is read."""
    _check_out(Path(out).expanduser(), force)
    model, info = load_model(str(init), "--init")
    return export_model(model, info, out, force, repo_id)


def push_to_hub(out, repo_id: str, private: bool = False) -> str:
    """Upload the folder `out` to the hub as model repository `repo_id` (created if need be); its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=repo_id, repo_type="model",
                          commit_message="gpt2-speedrun export")
    except Exception as e:  # offline, no token, no rights, a bad name: huggingface_hub raises many types
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UsageError(f"--push-to-hub {repo_id}: {reason}; the folder {out} is written, push it again once "
                         f"logged in (`hf auth login` or HF_TOKEN)") from None
    return str(url)
