"""gpt2/summary_schema.py: the summary.json of real runs holds only declared keys, each of its declared type, and
the report reads each field as the type declared there."""

import json
import typing

import pytest

from gpt2.reporting import build as report
from gpt2.summary_schema import FIELD_TYPES, number_type
from helpers import TINY_SCHEMA, data_args, run_py


def matches(value, declared) -> bool:
    """Whether a JSON value is of the declared type (Optional, List[...], Dict[str, ...], plain types)."""
    origin, args = typing.get_origin(declared), typing.get_args(declared)
    if origin is typing.Union:
        return any(matches(value, t) for t in args)
    if declared is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and matches(v, args[1]) for k, v in value.items())
    if declared is float:  # JSON has one kind of number: 989 may be a float field's value
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if declared is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, declared)


def problems(summary: dict) -> list:
    return [f"{key}: not declared in RunSummary" if key not in FIELD_TYPES else
            f"{key}: {value!r} is not {FIELD_TYPES[key]}" for key, value in summary.items()
            if key not in FIELD_TYPES or not matches(value, FIELD_TYPES[key])]


def test_the_checker_finds_an_undeclared_key_and_a_wrong_type():
    assert problems({"stage": "flash", "steps": 3, "mfu": None, "model_shape": {"n_layer": 2}}) == []
    assert problems({"stage": "flash", "stepz": 3}) == ["stepz: not declared in RunSummary"]
    assert problems({"steps": "3"}) == ["steps: '3' is not <class 'int'>"]
    assert problems({"overrides": ["a", 1]}) and problems({"exit_code": True})


@pytest.fixture(scope="module")
def finished_and_resumed(tmp_path_factory, shakespeare_path):
    """A single run that validates, samples and runs HellaSwag; then a run resumed from it."""
    tmp = tmp_path_factory.mktemp("schema")
    rows = tmp / "hellaswag.jsonl"
    rows.write_text("".join(json.dumps({"ctx": f"Row {i}: she opens the door and", "label": i % 4,
                                        "endings": ["walks in.", "sits down.", "sings.", "closes it."]}) + "\n"
                            for i in range(2)))
    common = [*TINY_SCHEMA, *data_args(tmp, shakespeare_path), "train.val_every=1", "train.hellaswag_every=2",
              f"train.hellaswag_data={rows}", "train.sample_every=2", "train.timing_skip=0"]
    first = run_py(*common, "train.steps=2", f"hydra.run.dir={tmp / 'first'}")
    resumed = run_py(*common, "train.steps=3", f"train.resume={tmp / 'first'}", f"hydra.run.dir={tmp / 'resumed'}")
    for result in (first, resumed):
        assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp / name / "summary.json").read_text()) for name in ("first", "resumed")]


@pytest.mark.slow
def test_a_real_runs_summary_holds_only_declared_keys_of_their_types(finished_and_resumed):
    first, resumed = finished_and_resumed
    assert first["status"] == "ok" and "hellaswag_acc_norm" in first and first["val_loss"] is not None
    assert resumed["start_step"] == 2 and resumed["resumed_from"]
    for summary in (first, resumed):
        assert problems(summary) == []


def test_the_report_reads_each_field_as_its_declared_type():
    assert set(report.FIELDS) <= set(FIELD_TYPES)
    assert number_type("steps") is int and number_type("mfu") is float and number_type("mfu_note") is None
    assert number_type("seq_len") is int  # Optional[int]: a number or null
    for field in report.FIELDS:
        kind = number_type(field)
        assert (field in report.INTEGER) == (kind is int), field
        assert (field in report.NUMERIC) == (kind in (int, float)), field
