"""train.compile_options: Inductor's options as a key (torch.compile(model, options=...)), checked before the run
against Inductor's own list and types, passed to torch.compile, and read back from the compiled module into the
summary's effective settings."""

import json

import pytest

from gpt2.training.checks import check_before_start
from gpt2.distributed import ranks_from_env
from gpt2.errors import UsageError
from helpers import TINY, compose_with, output_of, run_py, run_train


def refusal(*overrides) -> str:
    with pytest.raises(UsageError) as refused:
        check_before_start(compose_with(["+stage=compile", *TINY, *overrides]), ranks_from_env())
    assert "\n" not in str(refused.value)
    return str(refused.value)


def test_a_name_inductor_does_not_have_is_refused_with_the_nearest_names():
    message = refusal("+train.compile_options.coordinate_descent_tunin=true")
    assert message.startswith("train.compile_options.coordinate_descent_tunin is not an Inductor option")
    assert "did you mean coordinate_descent_tuning" in message and "torch._inductor.list_options()" in message


def test_a_value_of_the_wrong_type_is_refused_with_the_default():
    message = refusal("+train.compile_options.coordinate_descent_tuning=3")
    assert message == ("train.compile_options.coordinate_descent_tuning=3 must be a bool (its default: False)")


def test_options_without_compile_are_refused():
    with pytest.raises(UsageError, match=r"train.compile_options=\{'max_autotune': True\} are options of "
                                         r"torch.compile: add train.compile=true"):
        check_before_start(compose_with([*TINY, "+train.compile_options.max_autotune=true"]), ranks_from_env())


def test_known_names_pass_and_dashes_read_as_torch_compile_reads_them():
    check_before_start(compose_with(["+stage=compile", *TINY, "+train.compile_options.coordinate_descent_tuning=true",
                                     "+train.compile_options.epilogue-fusion=false"]), ranks_from_env())


@pytest.mark.slow  # starts run.py in a subprocess
def test_the_command_refuses_a_bad_option_before_making_the_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    result = run_py("+stage=compile", *TINY, "+train.compile_options.no_such_option=true", f"hydra.run.dir={run_dir}",
                    timeout=120)
    assert result.returncode == 2
    assert output_of(result).strip().splitlines() == [
        "error: train.compile_options.no_such_option is not an Inductor option; the names: python -c 'import "
        "torch._inductor; print(torch._inductor.list_options())'"]
    assert not run_dir.exists()


@pytest.mark.slow  # compiles the tiny model with Inductor (about 30 s on 2 cores)
def test_a_compiled_tiny_run_gets_the_options_and_records_them_as_inductor_holds_them(tmp_path, shakespeare_path):
    # a real Inductor compile on the CPU (~20 s on 2 cores): the options reach torch.compile, and the summary reads
    # them back from the compiled module's config rather than copying the request
    s, _ = run_train(tmp_path, shakespeare_path, "train.compile=true", "train.steps=2", "train.batch_size=2",
                     "train.seq_len=32", "train.total_batch_size=64",
                     "+train.compile_options.coordinate_descent_tuning=true")
    assert s["status"] == "ok" and s["effective"]["compiled"] is True
    assert s["effective"]["compile_options"] == {"coordinate_descent_tuning": True}
    assert json.loads(json.dumps(s["effective"]))["compile_options"] == {"coordinate_descent_tuning": True}


def test_a_run_without_options_records_none(tmp_path, shakespeare_path):
    s, _ = run_train(tmp_path, shakespeare_path, "train.steps=1", "train.batch_size=2", "train.seq_len=32")
    assert s["status"] == "ok" and s["effective"]["compile_options"] is None and s["effective"]["compiled"] is False
