"""EleutherAI's lm-evaluation-harness on a model in a Hugging Face folder, for `python -m gpt2.evaluate harness`.

The command (gpt2/evaluate.py) exports a run's model to a temporary Hugging Face folder (gpt2/runs/hf_folder.py)
and lm-eval's own "hf" backend (transformers) scores it here, so its figures are the harness's, comparable
with published ones: per task acc, acc_norm (with lm-eval's standard errors) and the rows scored; for
hellaswag, beside the figures our own evaluation recorded during training (summary.json), when there are any.
This module knows lm-eval and the folder, nothing of runs.

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

from pathlib import Path

from gpt2.errors import UsageError

INSTALL = "pip install -e '.[eval]'"
OURS = "build-nanogpt scoring (acc: summed loss, acc_norm: mean loss per token), during training"


def require_lm_eval():
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


def evaluate_folder(folder: Path, tasks: list, manager, device, batch_size: int = 8, limit=None,
                    log_samples: bool = False) -> tuple:
    """({task: {acc, acc_norm, their stderr, n, version}}, lm-eval's version, its per-row samples or None) of
    lm-eval's `tasks` on the Hugging Face model in `folder`."""
    lm_eval = require_lm_eval()
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
    version = results.get("lm_eval_version") or getattr(lm_eval, "__version__", None)
    return figures, version, results.get("samples")
