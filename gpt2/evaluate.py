"""Evaluate a model: a run of ours (its folder or checkpoint file), or Hugging Face GPT-2 weights.

    python -m gpt2.evaluate hellaswag --init gpt2                                  # GPT-2 124M: acc_norm 0.2955
    python -m gpt2.evaluate hellaswag --init outputs/2026-11-25/10-00-00_gpt2_124m_fineweb --out hs.json
    python -m gpt2.evaluate hellaswag --init RUN --data hellaswag_val.jsonl --limit 500   # offline, 500 rows
    python -m gpt2.evaluate harness --init RUN --tasks hellaswag,arc_easy     # lm-evaluation-harness: RUN/harness.json

hellaswag prints acc and acc_norm and writes them, with n and the settings, to --out as JSON. harness runs
EleutherAI's lm-evaluation-harness (the `eval` extra) on the run's model, exported to a temporary Hugging Face
folder (gpt2/evaluation/harness.py), and writes RUN/harness.json (or --out): per task acc and acc_norm, rows,
the lm-eval version and the command, beside the run's own HellaSwag figures.
"""

import argparse
import contextlib
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpt2.evaluation import harness
from gpt2.evaluation import hellaswag
from gpt2.training.devices import pick_device
from gpt2.errors import UsageError, command
from gpt2.files import atomic_write_bytes
from gpt2.runs.hf_folder import export_model, read_summary
from gpt2.runs.loading import describe, load_model
from gpt2.training.checkpoint import CHECKPOINT_NAME


def run_hellaswag(init: str, data=None, limit=None, device="auto", dtype="fp32", batch_examples: int = 4,
                  progress: bool = False) -> dict:
    device = pick_device(device, "--device")
    data_path = hellaswag.data_file(data)
    examples = hellaswag.load_examples(data_path, limit)
    model, info = load_model(init, "--init")  # a run folder / checkpoint of ours, or Hugging Face GPT-2
    model.to(device)
    print(f"hellaswag: {len(examples):,} rows of {data_path} | {describe(info)} | {device}, {dtype}", file=sys.stderr)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32, as build-nanogpt's hellaswag.py
    bf16 = dtype == "bf16"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    start = time.perf_counter()
    result = hellaswag.evaluate(model, examples, device, autocast, batch_examples=batch_examples, progress=progress)
    return {"task": "hellaswag", **result, "init": init, "model": describe(info), "data": str(data_path),
            "device": str(device), "dtype": dtype, "seconds": round(time.perf_counter() - start, 2),
            "published": hellaswag.PUBLISHED}


def run_harness(init: str, tasks: list, include_path=None, limit=None, device="auto", batch_size: int = 8,
                log_samples: bool = False, command: str = None):
    """(our result dict, lm-eval's per-row samples or None) of lm-eval's `tasks` on `init`'s model."""
    harness.require_lm_eval()  # the extra's absence said before the model is loaded
    if limit is not None and limit < 1:
        raise UsageError(f"--limit={limit} must be positive (or left out for every row)")
    device = pick_device(device, "--device")
    manager = harness.task_manager(tasks, include_path)
    model, info = load_model(init, "--init")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpt2-harness-") as tmp:
        folder = export_model(model, info, Path(tmp) / "model")
        del model  # lm-eval loads its own copy from the folder
        figures, version, samples = harness.evaluate_folder(folder, tasks, manager, device, batch_size, limit,
                                                            log_samples)
    result = {"harness": "lm-evaluation-harness", "lm_eval_version": version, "tasks": figures,
              "ours": harness.ours_beside(read_summary(info), tasks), "init": init, "model": describe(info),
              "device": str(device), "batch_size": batch_size, "limit": limit, "command": command,
              "seconds": round(time.perf_counter() - start, 2)}
    return result, samples


def harness_out(init: str):
    """RUN/harness.json for a run of ours (its folder, or its checkpoint's), else None."""
    path = Path(init).expanduser()
    folder = path if path.is_dir() else path.parent
    return folder / "harness.json" if (folder / CHECKPOINT_NAME).is_file() else None


def typed_command(argv: list) -> str:
    """The command as typed: the installed script by its name, else `python -m gpt2.evaluate`."""
    script = Path(sys.argv[0]).name
    prefix = [script] if script == "gpt2-evaluate" else ["python", "-m", "gpt2.evaluate"]
    return shlex.join(prefix + list(argv))


def harness_main(args, argv: list) -> int:
    """The `harness` subcommand."""
    tasks = [t.strip() for t in args.tasks.split(",")]
    if not all(tasks):
        raise UsageError(f"--tasks {args.tasks!r}: give task names separated by commas (e.g. hellaswag,arc_easy)")
    if args.batch < 1:
        raise UsageError(f"--batch={args.batch} must be positive")
    out = Path(args.out).expanduser() if args.out else harness_out(args.init)
    result, _ = run_harness(args.init, tasks, args.include_path, args.limit, args.device, args.batch,
                            command=typed_command(argv))
    for task, figures in result["tasks"].items():
        line = f"harness {task}: {figures['n']} rows" + "".join(
            f" | {k} {figures[k]:.4f}" for k in ("acc", "acc_norm") if isinstance(figures.get(k), float))
        mine = result["ours"].get(task)
        if mine:
            line += f" (ours, {harness.OURS}: acc_norm {mine['acc_norm']:.4f} on {mine['n']} rows)"
        print(line)
    if out is None:
        print("(not written: the model is not a run of ours; give --out FILE)", file=sys.stderr)
        return 0
    atomic_write_bytes(out, lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
    print(f"wrote {out}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gpt2.evaluate", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:6]))
    common = argparse.ArgumentParser(add_help=False)  # the options both evaluations take
    common.add_argument("--init", required=True,
                        help="a run folder, a checkpoint file, or a Hugging Face name / folder")
    common.add_argument("--limit", type=int, help="only the first N rows (of each task)")
    common.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    tasks = p.add_subparsers(dest="task", required=True, metavar="{hellaswag,harness}")
    hs = tasks.add_parser("hellaswag", parents=[common], help="HellaSwag, scored as build-nanogpt scores it")
    hs.add_argument("--data", help=f"a local {hellaswag.FILE_NAME} (default: downloaded once into the cache)")
    hs.add_argument("--out", help="write the result here as JSON")
    hs.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="fp32 (TF32 on GPU) or bf16 autocast")
    hs.add_argument("--batch", type=int, default=4, help="rows per forward pass (4 endings each)")
    lm = tasks.add_parser("harness", parents=[common], help="EleutherAI's lm-evaluation-harness (the eval extra)")
    lm.add_argument("--tasks", required=True, help="lm-eval task names, separated by commas (hellaswag,arc_easy)")
    lm.add_argument("--include-path", help="a folder of your own lm-eval task YAML files")
    lm.add_argument("--out", help="write the result here as JSON (default: RUN/harness.json for a run of ours)")
    lm.add_argument("--batch", type=int, default=8, help="lm-eval's batch size (requests per forward pass)")
    return p


@command()
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    if args.task == "harness":
        return harness_main(args, argv)
    if args.batch < 1:
        raise UsageError(f"--batch={args.batch} must be positive")
    result = run_hellaswag(args.init, args.data, args.limit, args.device, args.dtype, args.batch,
                           progress=sys.stderr.isatty())
    if args.out:
        out = Path(args.out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"hellaswag: {result['n']} rows | acc {result['acc']:.4f} | acc_norm {result['acc_norm']:.4f} "
          f"(GPT-2 124M, same scoring: acc 0.2859, acc_norm 0.2955)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
