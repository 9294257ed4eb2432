"""Shared test set-up: no network, tokenizer and Tiny Shakespeare from local copies where they exist; the
fixtures more than one test module uses. Helpers that are not fixtures live in tests/helpers.py.

This file imports nothing of the project's at the top: tests/test_ci_checks.py runs it alone, in a folder of its
own, so REPO is found here as in helpers.py."""

import os
from pathlib import Path

import pytest

pytest.register_assert_rewrite("helpers")  # its asserts report their values, as a test module's do

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # CI and the development machines keep offline copies here

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub miss otherwise retries for ~24 s
os.environ.setdefault("WANDB_MODE", "disabled")
if (SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))


def _find_shakespeare():
    given = os.environ.get("GPT2_SPEEDRUN_TEST_DATA")  # `python -m gpt2.bench --data FILE` passes its file here
    for candidate in ([Path(given)] if given else []) + [SHARED / "data" / "tinyshakespeare.txt",
                      Path(os.environ.get("GPT2_SPEEDRUN_CACHE", Path.home() / ".cache" / "gpt2-speedrun"))
                      / "tinyshakespeare.txt"]:
        if candidate.is_file():
            return candidate
    return None


def _download_shakespeare():
    """The project's own download (checksum, cache) into the cache folder; None when offline."""
    from gpt2.config import DataConfig
    from gpt2.data.batches import DEFAULT_FILE_NAME, _read_downloaded
    from gpt2.errors import UsageError

    cache = Path(os.environ.get("GPT2_SPEEDRUN_CACHE", Path.home() / ".cache" / "gpt2-speedrun")).expanduser()
    try:
        _read_downloaded(DataConfig(), cache)
    except UsageError:
        return None
    return cache / DEFAULT_FILE_NAME


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """The real Tiny Shakespeare text (1.1 MB): from GPT2_SPEEDRUN_TEST_DATA, ../shared, the cache, or
    downloaded by the project's own code; the tests that train or check exact tokens need it."""
    path = _find_shakespeare() or _download_shakespeare()
    if path is None:
        pytest.skip("Tiny Shakespeare is not on this machine and could not be downloaded (offline?): fetch "
                    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt "
                    "and set GPT2_SPEEDRUN_TEST_DATA=/path/to/input.txt")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A run folder with a tiny random model, served by uvicorn in a thread (tests/test_serve*.py): its base URL."""
    from gpt2.serve import create_app  # the serve extra: the modules that take this fixture skip without it
    from helpers import CAP, serving, tiny_run

    model, info = tiny_run(tmp_path_factory.mktemp("run"))
    with serving(create_app(model, info, max_tokens_cap=CAP, model_name="tiny")) as url:
        yield url


# ---------------------------------------------------------------- CI: no test skips unnoticed
# With GPT2_SPEEDRUN_STRICT_SKIPS=1 (.ci/run sets it) a skip is a failure unless it is one of these: a test
# marked `cuda` on a machine without one, the browser test without Chromium, the page's syntax check without
# Node.js, and the mirror image of the first (a check of running without CUDA, on a machine with CUDA).
# Anything else (the training data not found, an extra not installed, a module that failed to import) would
# otherwise pass CI with its tests never run.
STRICT_SKIPS = "GPT2_SPEEDRUN_STRICT_SKIPS"
EXPECTED_SKIPS = {
    "a test marked cuda": lambda is_cuda, reason: is_cuda,
    "the browser test without Chromium": lambda is_cuda, reason: "no Chromium and chromedriver" in reason,
    "the page script's syntax check without Node.js":
        lambda is_cuda, reason: reason.startswith("node is not installed"),
    "a no-CUDA check on a CUDA machine": lambda is_cuda, reason: reason == "this machine has CUDA",
}
_skips = pytest.StashKey[list]()  # (node id, reason, marked cuda?) of every skipped test and collector


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _record_skip(config, report, is_cuda: bool) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):  # an expected failure is not a skip
        config.stash.setdefault(_skips, []).append((report.nodeid, _skip_reason(report), is_cuda))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _record_skip(item.config, report, item.get_closest_marker("cuda") is not None)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    _record_skip(collector.config, report, False)  # a whole module skipped (pytest.importorskip)
    return report


def unexpected_skips(config) -> list:
    """(node id, reason) of the skips that EXPECTED_SKIPS does not name."""
    return [(nodeid, reason) for nodeid, reason, is_cuda in config.stash.get(_skips, [])
            if not any(expected(is_cuda, reason) for expected in EXPECTED_SKIPS.values())]


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    if os.environ.get(STRICT_SKIPS) == "1" and unexpected_skips(session.config) and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    found = unexpected_skips(config)
    if os.environ.get(STRICT_SKIPS) == "1" and found:
        terminalreporter.section(f"{len(found)} unexpected skip(s): failing ({STRICT_SKIPS}=1)", red=True)
        terminalreporter.line("only these may skip: " + "; ".join(EXPECTED_SKIPS))
        for nodeid, reason in found:
            terminalreporter.line(f"{nodeid}: {reason}", red=True)
