"""The checks CI (.ci/run) puts on the test suite itself: no test skips unnoticed (tests/conftest.py, with
GPT2_SPEEDRUN_STRICT_SKIPS=1), warnings the project causes are errors and a hanging test times out (pyproject's
[tool.pytest.ini_options]). Each runs pytest on a tiny suite of its own, in a fresh process."""

import sys

import pytest

from helpers import REPO

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.slow  # every test starts pytest or ruff in a fresh process

SUITE = '''
import pytest

@pytest.mark.cuda
def test_on_a_gpu():
    pytest.skip("no CUDA device: these run on a GPU machine (python -m gpt2.bench)")

def test_in_a_browser():
    pytest.skip("no Chromium and chromedriver on this machine (Debian: apt-get install chromium chromium-driver)")

@pytest.mark.xfail(reason="an expected failure is no skip")
def test_known_bug():
    assert False

def test_passes():
    pass
'''
NO_DATA = '''
def test_trains():
    pytest.skip("Tiny Shakespeare is not on this machine and could not be downloaded (offline?): fetch ...")
'''


@pytest.fixture
def suite(pytester):
    """A folder with this project's conftest.py and its markers, where pytest runs in a fresh process."""
    pytester.makeconftest((REPO / "tests" / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    cuda: needs a CUDA GPU\n    slow: starts a subprocess or trains\n")
    return pytester


def run(pytester, strict: bool, monkeypatch, *args):
    if strict:
        monkeypatch.setenv("GPT2_SPEEDRUN_STRICT_SKIPS", "1")
    else:
        monkeypatch.delenv("GPT2_SPEEDRUN_STRICT_SKIPS", raising=False)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", *args)


def test_an_unexpected_skip_fails_a_strict_run_and_says_which(suite, monkeypatch):
    suite.makepyfile(test_suite=SUITE + NO_DATA)
    result = run(suite, True, monkeypatch)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    assert "1 unexpected skip(s): failing (GPT2_SPEEDRUN_STRICT_SKIPS=1)" in out
    assert "test_suite.py::test_trains: Tiny Shakespeare is not on this machine" in out
    assert "test_on_a_gpu:" not in out and "test_in_a_browser:" not in out  # those two may skip
    result.assert_outcomes(passed=1, skipped=3, xfailed=1)


def test_without_the_variable_a_skip_is_only_a_skip(suite, monkeypatch):
    suite.makepyfile(test_suite=SUITE + NO_DATA)
    result = run(suite, False, monkeypatch)
    assert result.ret == pytest.ExitCode.OK and "unexpected skip" not in result.stdout.str()


def test_the_expected_skips_pass_a_strict_run(suite, monkeypatch):
    suite.makepyfile(test_suite=SUITE)
    result = run(suite, True, monkeypatch)
    assert result.ret == pytest.ExitCode.OK and "unexpected skip" not in result.stdout.str()
    result.assert_outcomes(passed=1, skipped=2, xfailed=1)


def test_a_module_skipped_at_import_fails_a_strict_run(suite, monkeypatch):
    """An extra not installed (pytest.importorskip at the top of a module) would hide all of its tests."""
    suite.makepyfile(test_suite=SUITE, test_cluster='''
import pytest
pytest.importorskip("no_such_plugin_here", reason="the plugin is not installed: pip install -e '.[cluster]'")

def test_sweep():
    pass
''')
    result = run(suite, True, monkeypatch)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert "test_cluster.py: the plugin is not installed: pip install -e '.[cluster]'" in result.stdout.str()


def test_a_deselected_test_is_not_a_skip(suite, monkeypatch):
    """`-m "not slow"` (the fast tests) leaves a slow test out: not run, so not a skip a strict run fails on."""
    suite.makepyfile(test_suite=SUITE + "\n@pytest.mark.slow" + NO_DATA)
    result = run(suite, True, monkeypatch, "-m", "not slow")
    assert result.ret == pytest.ExitCode.OK and "unexpected skip" not in result.stdout.str()
    result.assert_outcomes(passed=1, skipped=2, xfailed=1, deselected=1)
    everything = run(suite, True, monkeypatch)  # the same suite in full: the slow test's skip is unexpected
    assert everything.ret == pytest.ExitCode.TESTS_FAILED and "1 unexpected skip(s)" in everything.stdout.str()


def test_a_failing_run_keeps_its_exit_status(suite, monkeypatch):
    suite.makepyfile(test_suite=SUITE + NO_DATA + "\ndef test_fails():\n    assert False\n")
    result = run(suite, True, monkeypatch)
    assert result.ret == pytest.ExitCode.TESTS_FAILED and "1 unexpected skip(s)" in result.stdout.str()


# ---------------------------------------------------------------- the project's pytest settings

WARNINGS = '''
import gc
import time
import warnings


def test_a_warning_of_gpt2s_own_code():
    warnings.warn_explicit("deprecated call", DeprecationWarning, "gpt2/training/loop.py", 1,
                           module="gpt2.training.loop")


def test_a_third_party_warning():
    warnings.warn_explicit("deprecated call", DeprecationWarning, "torch/x.py", 1, module="torch.x")


def test_a_module_named_like_gpt2_but_not_it():
    warnings.warn_explicit("deprecated call", DeprecationWarning, "x.py", 1, module="gpt2_other")


class Broken:
    def __del__(self):
        raise RuntimeError("nobody sees this")


def test_an_exception_nobody_saw():
    Broken()
    gc.collect()


def test_hangs():
    time.sleep(60)
'''


def test_project_warnings_are_errors_and_a_hang_times_out(tmp_path):
    """pyproject.toml's own settings, on a test file beside the project (timeout lowered to 3 s for the hang)."""
    (tmp_path / "test_settings.py").write_text(WARNINGS)
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(REPO),
                           "-p", "no:cacheprovider", "-q", "-o", "timeout=3", str(tmp_path / "test_settings.py")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    out = proc.stdout
    assert "FAILED" in out and "Unknown config option" not in out + proc.stderr, out[-3000:]
    failed = {line.split("::")[1].split(" ")[0] for line in out.splitlines() if line.startswith("FAILED")}
    assert failed == {"test_a_warning_of_gpt2s_own_code", "test_an_exception_nobody_saw", "test_hangs"}, out[-3000:]
    assert "Timeout (>3.0s)" in out


def test_the_linter_ci_runs_flags_what_it_should_and_passes_the_project(tmp_path):
    """.ci/run's `ruff check .` with pyproject.toml's [tool.ruff]: the project itself is clean, and a file with a
    line over 120 characters and an unused import fails it, each named."""
    import subprocess

    ruff = [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise"]
    clean = subprocess.run([*ruff, "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]
    (tmp_path / "bad.py").write_text("import os\n\nx = '" + "a" * 120 + "'\n")
    dirty = subprocess.run([*ruff, "--config", str(REPO / "pyproject.toml"), str(tmp_path / "bad.py")],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert dirty.returncode == 1
    assert "F401" in dirty.stdout and "E501" in dirty.stdout, dirty.stdout
    assert "ruff check ." in (REPO / ".ci" / "run").read_text()
