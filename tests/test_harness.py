"""python -m gpt2.evaluate harness: lm-evaluation-harness on a tiny run's model, offline, on a local task in
lm-eval's YAML format over HellaSwag-like rows, checked row by row against our own HellaSwag scoring
(gpt2/evaluation/hellaswag.py); the JSON it writes beside the run's own figures; one-line errors."""

import json
import sys

import pytest
import torch

from gpt2 import evaluate as evaluate_cmd
from gpt2.evaluation import hellaswag
from helpers import tiny_run

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra is not installed: pip install -e '.[eval]'")

ROWS = [
    {"ctx": "A man is sitting on a roof. he", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ctx": "Kids are playing in the park. A boy", "label": 0,
     "endings": ["kicks the ball.", "flies.", "is eating a very large sandwich made of bread, cheese and ham.",
                 "sleeps"]},
    {"ctx": "How to make tea. Boil the water", "label": 1,
     "endings": ["in a kettle, then pour it over the leaves.", "and wait.", "quickly", "with salt — ünïcödé ✓"]},
    {"ctx": "The chef cuts the onions. Then he", "label": 1,
     "endings": ["fries them.", "cries.", "puts them in a pan with oil and stirs them for a while.", "leaves."]},
    {"ctx": "She ties her shoes and", "label": 2,
     "endings": ["runs 10 km before breakfast.", "sits.", "goes out for a run in the rain.", "naps for 3 hours."]},
]
# lm-eval's multiple-choice task over the rows above, as HellaSwag's own task reads its data set: context, then
# " " + ending (lm-eval's default target_delimiter). Named hellaswag so that the run's own figures go beside it.
TASK = """task: hellaswag
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {rows}
  cache_dir: {cache}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
OURS = {"hellaswag_acc_norm": 0.25, "hellaswag_acc": 0.5, "hellaswag_n": 4}  # as the run's training recorded them


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A folder holding the task's YAML and its rows (a local JSON lines file: nothing from the hub)."""
    folder = tmp_path_factory.mktemp("tasks")
    rows = folder / "rows.jsonl"
    rows.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    (folder / "hellaswag.yaml").write_text(TASK.format(rows=rows, cache=folder / "datasets-cache"))
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with a tiny random model whose summary holds HellaSwag figures. GPT-2's 50257 rows, no
    padding: our scoring's softmax covers every row of the table, and random padded rows would hold ~0.1 % of
    the mass that the exported model (the 50257 real ids) does not have."""
    folder = tmp_path_factory.mktemp("run")
    model, _ = tiny_run(folder, vocab_size=50257)
    summary = json.loads((folder / "summary.json").read_text())
    (folder / "summary.json").write_text(json.dumps({**summary, **OURS}))
    return folder, model


@pytest.fixture(scope="module")
def scored(run, tasks):
    return evaluate_cmd.run_harness(str(run[0]), ["hellaswag"], tasks, device="cpu", batch_size=4,
                                    log_samples=True)


def test_lm_evals_log_probabilities_are_ours_and_its_acc_is_our_acc(run, scored):
    result, samples = scored
    rows = sorted(samples["hellaswag"], key=lambda s: s["doc_id"])
    assert [s["doc"]["ctx"] for s in rows] == [r["ctx"] for r in ROWS]
    logprob = torch.tensor([[choice[0][0] for choice in s["resps"]] for s in rows], dtype=torch.float64)
    summed, mean = hellaswag.ending_losses(run[1].eval(), ROWS, "cpu")  # ours: loss over each ending's tokens
    torch.testing.assert_close(logprob, -summed.double(), rtol=1e-5, atol=1e-4)

    labels = torch.tensor([r["label"] for r in ROWS])
    lm_acc = torch.tensor([s["acc"] for s in rows])
    assert torch.equal(lm_acc, (summed.argmin(1) == labels).float())  # acc: the same rule, row by row
    ours = hellaswag.evaluate(run[1], ROWS, "cpu")
    assert result["tasks"]["hellaswag"]["acc"] == pytest.approx(ours["acc"])

    # acc_norm: lm-eval divides the summed log-probability by the ending's characters, ours takes the mean
    # loss per token; each is exactly its own rule on the same per-row sums
    chars = torch.tensor([[len(e) for e in r["endings"]] for r in ROWS], dtype=torch.float64)
    lm_norm_pick = (logprob / chars).argmax(1)
    assert torch.equal(torch.tensor([s["acc_norm"] for s in rows]), (lm_norm_pick == labels).float())
    assert result["tasks"]["hellaswag"]["acc_norm"] == pytest.approx((lm_norm_pick == labels).double().mean().item())
    assert ours["acc_norm"] == pytest.approx((mean.argmin(1) == labels).double().mean().item())
    same = (lm_norm_pick == mean.argmin(1)).sum().item()
    print(f"\nacc: lm-eval {result['tasks']['hellaswag']['acc']:.4f}, ours {ours['acc']:.4f} (same rows); acc_norm: "
          f"lm-eval {result['tasks']['hellaswag']['acc_norm']:.4f} (per character), ours {ours['acc_norm']:.4f} "
          f"(per token); the two acc_norm picks agree on {same} of {len(ROWS)} rows; largest log-probability "
          f"difference {(logprob + summed.double()).abs().max().item():.2e}")


def test_the_command_writes_harness_json_beside_our_figures(run, tasks, capsys):
    folder = run[0]
    argv = ["harness", "--init", str(folder), "--tasks", "hellaswag", "--include-path", str(tasks), "--limit", "3",
            "--device", "cpu", "--batch", "2"]
    assert evaluate_cmd.main(argv) == 0
    result = json.loads((folder / "harness.json").read_text())
    figures = result["tasks"]["hellaswag"]
    assert figures["n"] == 3 and 0 <= figures["acc"] <= 1 and 0 <= figures["acc_norm"] <= 1
    assert "acc_stderr" in figures and result["lm_eval_version"] == lm_eval.__version__
    assert result["command"] == "python -m gpt2.evaluate " + " ".join(argv)
    assert result["ours"]["hellaswag"]["acc_norm"] == OURS["hellaswag_acc_norm"]
    assert result["ours"]["hellaswag"]["n"] == OURS["hellaswag_n"]
    out = capsys.readouterr().out
    assert f"harness hellaswag: 3 rows | acc {figures['acc']:.4f} | acc_norm {figures['acc_norm']:.4f}" in out
    assert "(ours, build-nanogpt scoring" in out and f"wrote {folder / 'harness.json'}" in out


@pytest.mark.parametrize("case, words", [
    ("no lm_eval", "harness needs lm-evaluation-harness (lm_eval is not installed): pip install -e '.[eval]'"),
    ("no folder", "--include-path"),
    ("no data", "lm-eval could not load a task's data"),
    ("empty task", "--tasks 'hellaswag,': give task names separated by commas"),
])
def test_bad_input_is_one_line(run, tasks, tmp_path, monkeypatch, capsys, case, words):
    args = ["--tasks", "hellaswag", "--include-path", str(tasks)]
    if case == "no lm_eval":
        monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    elif case == "no folder":
        args[3] = str(tmp_path / "nowhere")
    elif case == "no data":
        (tmp_path / "missing.yaml").write_text(TASK.format(rows=tmp_path / "gone.jsonl", cache=tmp_path / "cache"))
        args[3] = str(tmp_path)
    else:
        args[1] = "hellaswag,"
    assert evaluate_cmd.main(["harness", "--init", str(run[0]), "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert last.startswith("error: ") and words in last, err[-2000:]
