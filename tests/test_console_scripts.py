"""The commands `pip install -e .` puts on the PATH (pyproject's [project.scripts]) work from any folder: each
is installed beside the venv's python and answers --help, and gpt2-train (run.py's entrypoint, gpt2/cli.py)
trains, refuses bad settings as run.py does, completes on TAB and finds the project's Hydra launchers. Every
command runs from a tmp_path, never the repository, with no PYTHONPATH: only the install can find the code."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2 import cli
from helpers import run_py

BIN = Path(sys.executable).parent
COMMANDS = ["gpt2-train", "gpt2-sample", "gpt2-serve", "gpt2-report", "gpt2-bench", "gpt2-prepare", "gpt2-evaluate",
            "gpt2-export"]
REINSTALL = 'reinstall after editing pyproject.toml: pip install -e ".[cpu,dev,serve,cluster,eval]"'


def command(name, *args, cwd, env=None):
    """`name args` as a user types it in cwd: the installed script, and the environment without PYTHONPATH."""
    env = {k: v for k, v in (env or os.environ).items() if k != "PYTHONPATH"}
    assert (BIN / name).is_file(), f"{BIN / name} is missing; {REINSTALL}"
    return subprocess.run([str(BIN / name), *args], cwd=cwd, env=dict(env, PYTHONUNBUFFERED="1"),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.slow
def test_every_command_is_installed_and_answers_help(tmp_path, name):
    result = command(name, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("== Stages" if name == "gpt2-train" else "usage:") in result.stdout
    assert list(tmp_path.iterdir()) == []  # --help makes no outputs/ folder


@pytest.mark.slow
def test_gpt2_train_trains_from_another_folder(tmp_path, shakespeare_path):
    run_dir = tmp_path / "run"
    result = command("gpt2-train", "+stage=flash", "model=tiny", "train.device=cpu", "train.steps=1",
                     f"data.path={shakespeare_path}", f"data.cache_dir={tmp_path / 'cache'}",
                     f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["stage"] == "flash" and summary["steps"] == 1
    assert (run_dir / "run.log").is_file()  # Hydra's job name stays `run`, as under python run.py
    # the command recorded to re-run it is the one typed, by its name, not `python .venv/bin/gpt2-train`
    assert summary["command"].startswith("gpt2-train +stage=flash model=tiny "), summary["command"]


@pytest.mark.parametrize("args", [
    ["+stage.name=../x"],  # refused before Hydra starts (check_command_line)
    ["model=tiny", "train.device=cpu", "train.seq_len=65"],  # refused by the job: its exit code comes through
    ["train.stepz=1"],  # a typo in a key: Hydra's own error
])
@pytest.mark.slow
def test_a_bad_setting_gets_the_same_error_and_exit_code_as_run_py(tmp_path, shakespeare_path, args):
    args = [*args, f"data.path={shakespeare_path}", f"hydra.run.dir={tmp_path / 'run'}"]
    by_script = command("gpt2-train", *args, cwd=tmp_path)
    by_run_py = run_py(*args, cwd=tmp_path)
    assert by_script.returncode == by_run_py.returncode != 0
    assert by_script.stderr == by_run_py.stderr and "Traceback" not in by_script.stderr
    assert not (tmp_path / "run").exists()
    if by_script.returncode == 2:  # ours: one line that says what is wrong
        assert by_script.stderr.startswith("error: ") and by_script.stderr.count("\n") == 1


@pytest.mark.slow
def test_gpt2_train_finds_the_projects_launchers_from_another_folder(tmp_path):
    # Hydra imports every module of the hydra_plugins namespace on start: ours must be among them, installed
    plugins = command("gpt2-train", "--info", "plugins", cwd=tmp_path)
    assert plugins.returncode == 0, plugins.stderr[-2000:]
    assert "hydra_plugins.gpt2_speedrun_launchers" in plugins.stdout
    assert "hydra_plugins.hydra_submitit_launcher" in plugins.stdout  # beside, not instead of, submitit's part
    composed = command("gpt2-train", "hydra/launcher=local_cpu", "--cfg", "hydra", cwd=tmp_path)
    assert composed.returncode == 0, composed.stderr[-2000:]
    assert "_target_: hydra_plugins.gpt2_speedrun_launchers.LocalLauncher" in composed.stdout


@pytest.mark.slow
def test_gpt2_train_tab_completion_from_another_folder(tmp_path):
    install = command("gpt2-train", "-sc", "install=bash", cwd=tmp_path)
    assert install.returncode == 0 and install.stdout.rstrip().endswith("-F hydra_bash_completion gpt2-train")
    env = dict(os.environ, COMP_LINE="gpt2-train +stage=", COMP_POINT="18")  # as bash asks after a TAB
    query = command("gpt2-train", "-sc", "query=bash", cwd=tmp_path, env=env)
    assert query.returncode == 0 and "+stage=flash" in query.stdout.split()


# ---- train_main itself (in-process): what run.py did before it moved into the package -------------------

@pytest.fixture
def started(monkeypatch):
    """The argv Hydra's entrypoint would have started with; it runs nothing."""
    seen = []
    monkeypatch.setattr(cli, "run_training", lambda: seen.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", ["gpt2-train", "+stage=flash"])
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return seen


def test_a_non_editable_install_is_refused_in_one_line(monkeypatch, capsys, tmp_path, started):
    monkeypatch.setattr(cli, "CONF_DIR", tmp_path / "site-packages" / "conf")  # where `pip install .` puts it
    assert cli.train_main() == 2
    assert started == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no Hydra configs at ")
    assert err.rstrip().endswith("install it editable from there: pip install -e .")


def test_torchrun_ranks_get_their_overrides(monkeypatch, started):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.train_main() == 0
    assert started == [["gpt2-train", "+stage=flash", "hydra.output_subdir=null",
                        "hydra.job_logging.root.handlers=[console]", "hydra.job_logging.root.level=WARNING",
                        "hydra.hydra_logging.root.level=WARNING"]]


def test_ctrl_c_during_set_up_exits_130_in_one_line(monkeypatch, capsys, started):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_training", interrupted)
    assert cli.train_main() == 130
    assert capsys.readouterr().err == "interrupted: stopped at once; nothing was saved after the last checkpoint\n"
