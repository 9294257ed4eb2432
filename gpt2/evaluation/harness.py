"""EleutherAI's lm-evaluation-harness on a run's model: `python -m gpt2.evaluate harness --init RUN --tasks ...`.

The model is exported to a temporary Hugging Face folder (gpt2/runs/hf_folder.py) and lm-eval's own "hf" backend
(transformers) scores it, so its figures are the harness's, comparable with published ones. The result is one
JSON file (RUN/harness.json unless --out says otherwise): per task acc, acc_norm (with lm-eval's standard
errors) and the rows scored, the lm-eval version and the command; for hellaswag, beside the figures our own
evaluation recorded during training (summary.json), when there are any.

The two HellaSwag scorings differ. Both read the context and " " + ending and sum the log-probabilities of the
ending's tokens (ours as the loss, the negated sum), so lm-eval's `acc` (the largest summed log-probability) is
our `acc` (the smallest summed loss) when both read the same text. Their `acc_norm` differ: lm-eval divides the
summed log-probability by the ending's length in characters, build-nanogpt's scoring (hellaswag.py) takes
the mean loss per token. lm-eval's hellaswag task also rewrites the text (the activity label before the
context, WikiHow's bracketed artefacts removed), so its acc differs from ours on the published data set too.
tests/test_harness.py holds the two to this on the same rows: the same per-ending log-probabilities (to 1e-4),
the same acc row by row, and each acc_norm its own rule. (On a padded table, 50304 rows, our softmax also
covers the padded ids, which training drives to nothing; the exported model has the 50257 real ones only.)
"""

import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from gpt2.training.checkpoint import CHECKPOINT_NAME
from gpt2.training.devices import pick_device
from gpt2.errors import UsageError
from gpt2.files import atomic_write_bytes
from gpt2.runs.hf_folder import export_model, read_summary
from gpt2.runs.loading import describe, load_model

INSTALL = "pip install -e '.[eval]'"
OURS = "build-nanogpt scoring (acc: summed loss, acc_norm: mean loss per token), during training"


def _lm_eval():
    """lm_eval, with the "hf" backend it needs importable (it imports accelerate), or one line saying how."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401 (the backend: needs accelerate)
    except ImportError as e:
        raise UsageError(f"harness needs lm-evaluation-harness ({e.name or e} is not installed): {INSTALL}") from None
    return lm_eval


def task_manager(tasks: list, include_path=None):
    """lm-eval's TaskManager that knows `tasks` (with the YAML tasks of include_path); an unknown one is refused."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        include_path = Path(include_path).expanduser()
        if not include_path.is_dir():
            raise UsageError(f"--include-path {include_path}: no such folder; give the folder of your task YAML files")
        # local tasks alone: not indexing lm-eval's ~15,000 own task files saves ~10 s per run
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(f"--tasks: lm-eval has no task {unknown[0]!r}; `lm-eval ls tasks` lists them, and "
                         f"--include-path DIR adds your own")
    return manager


def _metrics(figures: dict) -> dict:
    """lm-eval's {"acc,none": x, "acc_stderr,none": s, "alias": ...} as {"acc": x, "acc_stderr": s}."""
    out = {}
    for key, value in figures.items():
        if "," in key:
            metric, filter_name = key.split(",", 1)
            out[metric if filter_name == "none" else key] = value
    return out


def ours_beside(summary, tasks) -> dict:
    """Our own HellaSwag figures of the run (summary.json's, from training), for the hellaswag task."""
    if "hellaswag" not in tasks or not summary or summary.get("hellaswag_acc_norm") is None:
        return {}
    return {"hellaswag": {"acc": summary.get("hellaswag_acc"), "acc_norm": summary["hellaswag_acc_norm"],
                          "n": summary.get("hellaswag_n"), "scoring": OURS, "source": "summary.json"}}


def run_harness(init: str, tasks: list, include_path=None, limit=None, device="auto", batch_size: int = 8,
                log_samples: bool = False, command: str = None):
    """(our result dict, lm-eval's per-row samples or None) of lm-eval's `tasks` on `init`'s model."""
    lm_eval = _lm_eval()
    if limit is not None and limit < 1:
        raise UsageError(f"--limit={limit} must be positive (or left out for every row)")
    device = pick_device(device, "--device")
    manager = task_manager(tasks, include_path)
    model, info = load_model(init, "--init")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpt2-harness-") as tmp:
        folder = export_model(model, info, Path(tmp) / "model")
        del model  # lm-eval loads its own copy from the folder
        try:
            results = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(folder), "dtype": "float32"},
                                              tasks=list(tasks), task_manager=manager, device=str(device),
                                              batch_size=batch_size, limit=limit, log_samples=log_samples)
        except OSError as e:  # a task's data not reached (offline: the hub) or not found (a local data_files)
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise UsageError(f"--tasks {','.join(tasks)}: lm-eval could not load a task's data ({reason}); lm-eval "
                             "downloads its tasks' data sets from the Hugging Face hub, so offline give tasks of "
                             "your own whose data_files are local (--include-path DIR)") from None
    figures = {}
    for task, row in results["results"].items():
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        figures[task] = {**_metrics(row), "n": n, "version": results.get("versions", {}).get(task)}
    summary = read_summary(info)
    lm_eval_version = results.get("lm_eval_version") or getattr(lm_eval, "__version__", None)
    result = {"harness": "lm-evaluation-harness", "lm_eval_version": lm_eval_version,
              "tasks": figures, "ours": ours_beside(summary, tasks), "init": init, "model": describe(info),
              "device": str(device), "batch_size": batch_size, "limit": limit, "command": command,
              "seconds": round(time.perf_counter() - start, 2)}
    return result, results.get("samples")


def default_out(init: str):
    """RUN/harness.json for a run of ours (its folder, or its checkpoint's), else None."""
    path = Path(init).expanduser()
    folder = path if path.is_dir() else path.parent
    return folder / "harness.json" if (folder / CHECKPOINT_NAME).is_file() else None


def typed_command(argv: list) -> str:
    """The command as typed: the installed script by its name, else `python -m gpt2.evaluate`."""
    script = Path(sys.argv[0]).name
    prefix = [script] if script == "gpt2-evaluate" else ["python", "-m", "gpt2.evaluate"]
    return shlex.join(prefix + list(argv))


def main(args, argv: list) -> int:
    """The `harness` subcommand of gpt2.evaluate (args parsed there)."""
    tasks = [t.strip() for t in args.tasks.split(",")]
    if not all(tasks):
        raise UsageError(f"--tasks {args.tasks!r}: give task names separated by commas (e.g. hellaswag,arc_easy)")
    if args.batch < 1:
        raise UsageError(f"--batch={args.batch} must be positive")
    out = Path(args.out).expanduser() if args.out else default_out(args.init)
    result, _ = run_harness(args.init, tasks, args.include_path, args.limit, args.device, args.batch,
                            command=typed_command(argv))
    for task, figures in result["tasks"].items():
        line = f"harness {task}: {figures['n']} rows" + "".join(
            f" | {k} {figures[k]:.4f}" for k in ("acc", "acc_norm") if isinstance(figures.get(k), float))
        mine = result["ours"].get(task)
        if mine:
            line += f" (ours, {OURS}: acc_norm {mine['acc_norm']:.4f} on {mine['n']} rows)"
        print(line)
    if out is None:
        print("(not written: the model is not a run of ours; give --out FILE)", file=sys.stderr)
        return 0
    atomic_write_bytes(out, lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
    print(f"wrote {out}")
    return 0
