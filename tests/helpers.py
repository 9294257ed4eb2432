"""What the test modules share: composing the configs, training in-process or through `python run.py` (and
torchrun), reading what a run leaves, the tiny-model override lists, a stand-in llm.c checkout and a tiny model
served over loopback. Fixtures live in conftest.py; test modules import these from here, never from each other
(pyproject's pytest `pythonpath` holds tests/, so `import helpers` works from any folder)."""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import gpt2.runs.job  # noqa: F401  registers the schema and the shared_now resolver that compose_with needs
from gpt2.bench import sweep_stage_names
from gpt2.training.checkpoint import CHECKPOINT_NAME
from gpt2.runs.loading import load_model
from gpt2.model.gpt import GPT, GPTConfig
from gpt2.training.loop import train

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
STAGES = sweep_stage_names("speedup_full")  # every stage of the project, in order
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")  # a checkpoint's model_shape


# ---- tiny runs: the override lists ----------------------------------------------------------------------
# The tiny model on the CPU at 2x32 tokens a step, one validation batch, ms/step from the second step: a run
# that takes a second or two and still fills every field of its summary.
TINY = ["model=tiny", "train.device=cpu", "train.batch_size=2", "train.seq_len=32", "train.timing_skip=1",
        "train.val_batches=1"]


def tiny_with(*changes: str, drop: tuple = ()) -> list:
    """TINY with each `key=value` of changes in place of that key's entry (added at the end if TINY has none),
    and the keys in drop left out."""
    def key(override):
        return override.split("=", 1)[0]
    new = {key(change): change for change in changes}
    kept = [new.pop(key(override), override) for override in TINY if key(override) not in drop]
    return kept + list(new.values())


# whole sweeps (tests/test_sweep.py): 3 steps a job, the number its summaries are checked for
TINY_SWEEP = tiny_with("train.steps=3")
# sweeps under a Hydra launcher plugin (tests/test_cluster.py): 2 steps, as each job also starts a process
TINY_CLUSTER = tiny_with("train.steps=2")
# torchrun (tests/test_ddp.py, test_preemption.py, test_first_run.py): the GPT-3 optimizer (cosine schedule, AdamW
# moments, clipping) so that ranks or a restart out of step would show in the losses, and 2 validation batches
# so that each of two ranks evaluates one (the ranks share them)
TINY_DDP = ["+stage=gpt3-optim", *tiny_with("train.val_batches=2")]
# the token shards (tests/test_shards.py): 16-token sequences, 32 tokens a step, so that steps start where the
# tests' small shards put their boundaries; timing_skip at its default (nothing there reads ms/step)
TINY_SHARDS = tiny_with("train.seq_len=16", "train.val_batches=2", drop=("train.timing_skip",))
# the summary schema's runs (tests/test_summary_schema.py), which validate, sample and run HellaSwag every step or
# two: 16-token sequences; the test sets timing_skip itself
TINY_SCHEMA = tiny_with("train.seq_len=16", drop=("train.timing_skip",))


# ---- configs and in-process runs ------------------------------------------------------------------------

def compose_with(overrides, config_dir=CONF):
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def run_train(tmp_path, shakespeare_path, *overrides, name="run"):
    """Compose like `python run.py <overrides>` and run the loop into tmp_path/name; returns the summary."""
    cfg = compose_with(["model=tiny", "train.device=cpu", f"data.path={shakespeare_path}",
                        f"data.cache_dir={tmp_path / 'cache'}", "train.val_batches=1", *overrides])
    run_dir = tmp_path / name
    run_dir.mkdir()
    summary = {"stage": cfg.stage.name}
    train(cfg, run_dir, summary)
    return summary, run_dir


def saved_weights(run_dir):
    return torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)["model"]


# ---- what a run leaves ----------------------------------------------------------------------------------

def records(run_dir, key="loss"):
    """The lines of metrics.jsonl that carry `key` (steps: "loss"; validations: "val_loss")."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if key in r]


def summaries(sweep_dir):
    """{job folder name: its summary.json} of a sweep, in job order."""
    jobs = sorted((p for p in sweep_dir.iterdir() if (p / "summary.json").is_file()),
                  key=lambda p: int(p.name.split("_")[0]))
    return {p.name: json.loads((p / "summary.json").read_text()) for p in jobs}


def strict_json(path):
    """summary.json as strict JSON: NaN or Infinity would break jq, browsers and most other readers."""
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- python run.py and torchrun, in a subprocess --------------------------------------------------------

def run_py(*args, cwd=REPO, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def data_args(tmp_path, shakespeare_path):
    return [f"data.path={shakespeare_path}", f"data.cache_dir={tmp_path / 'cache'}"]


def output_of(result) -> str:
    return result.stdout + result.stderr


def launch(nproc, args, cwd, wait=True, torchrun=None, script=REPO / "run.py", env=None):
    """`torchrun --standalone --nproc_per_node=nproc run.py args` (or plain python for one process) in cwd.

    torchrun: the launcher's flags instead of --standalone (a rendezvous of several agents, restarts), for any
    nproc; script: what each process runs instead of run.py; env: variables added to the environment."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    if torchrun is None and nproc > 1:
        torchrun = ["--standalone"]
    prefix = [sys.executable, "-m", "torch.distributed.run", *torchrun, f"--nproc_per_node={nproc}"] \
        if torchrun is not None else [sys.executable]
    cmd = [*prefix, str(script), *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # a session of its own: on a hang, the whole tree goes (torchrun's workers too, not only torchrun)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... did not end in 300 s; its output:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- a stand-in llm.c checkout (tests/test_peers.py, and test_bench.py's smoke) -------------------------
# A stand-in for train_gpt2cu: checks its flags and its token files as llm.c would, records what it got
# (fake_run.json), and prints step lines in train_gpt2.cu's printf format. Step 1 is slow (as a real
# first step is), the others 100 or 104 ms: a median that kept step 1 would come out different.
FAKE_TRAIN = '''#!{python}
import json, sys
import numpy as np

args = sys.argv[1:]
flags = dict(zip(args[::2], args[1::2]))
def fail(why):
    print("fake train_gpt2cu: " + why)
    sys.exit(1)
if len(args) % 2 or any(not a.startswith("-") for a in args[::2]):
    fail("flags come in pairs")
if flags.get("-e") != "d12" or flags.get("-s") != "0" or flags.get("-n") != "0" or "-o" in flags:
    fail("expected random init (-e d12), no sampling (-s 0), no checkpoints (-n 0, no -o)")
B, T, D, X, V = (int(flags[k]) for k in ("-b", "-t", "-d", "-x", "-v"))
if D % (B * T) or V <= X:
    fail("-d must be a multiple of B*T and -v beyond -x")
files = {{}}
for key in ("-i", "-j"):
    data = open(flags[key], "rb").read()
    header = np.frombuffer(data[:1024], dtype="<i4")
    if header[0] != 20240520 or header[1] != 1:
        print("Bad magic in the data file")
        sys.exit(1)
    n = int(header[2])
    if len(data) != 1024 + 2 * n or n < B * T + 1:
        fail("file size is not as expected")
    files[key] = {{"tokens": n, "first": np.frombuffer(data[1024:1034], dtype="<u2").tolist()}}
json.dump({{"argv": args, "files": files}}, open("fake_run.json", "w"))
print("| max_steps             | %-50d |" % X)
print("val loss 11.012345")
for step in range(X):
    ms = 5000.0 if step == 0 else (100.0 if step % 2 else 104.0)
    print("step %4d/%d | loss %7.6f (%+.2fz)| norm %6.4f (%+.2fz)| lr %.2e | %.2f ms | %.1f%% bf16 MFU | %.0f tok/s"
          % (step + 1, X, 11.0 - 0.1 * step, float("nan"), 1.5, float("nan"), 6e-5, ms, 38.5, D / ms * 1000))
print("total average iteration time: 102.000000 ms")
'''

MAKEFILE = """train_gpt2cu:
\tcp fake_train_gpt2cu.py train_gpt2cu
\tchmod +x train_gpt2cu
\techo "USE_CUDNN=$(USE_CUDNN) NO_MULTI_GPU=$(NO_MULTI_GPU) NO_USE_MPI=$(NO_USE_MPI)" > make_vars.txt
"""


def make_fake_llmc(folder: Path, makefile: str = MAKEFILE) -> Path:
    """A stand-in llm.c checkout whose `make train_gpt2cu` writes FAKE_TRAIN."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Makefile").write_text(makefile)
    (folder / "train_gpt2.cu").write_text("// stand-in\n")
    (folder / "fake_train_gpt2cu.py").write_text(FAKE_TRAIN.format(python=sys.executable))
    return folder


# ---- a tiny model served over loopback (tests/test_serve*.py) -------------------------------------------
# uvicorn, httpx and selenium are imported where used: they are extras, and the modules that need them skip
# (pytest.importorskip, with SERVE_EXTRA) where they are missing
SERVE_EXTRA = "the serve extra is not installed: pip install -e '.[serve]'"
BLOCK = 64
CAP = 4000


def tiny_run(folder, vocab_size=50304):
    """A run folder holding a tiny random model: (model, info) as load_model reads it back."""
    torch.manual_seed(0)
    shape = dict(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=vocab_size)
    model = GPT(GPTConfig(**shape))
    torch.save({"model": model.state_dict(), "model_shape": shape, "step": 7, "config": "stage:\n  name: flash\n"},
               folder / "checkpoint.pt")
    (folder / "summary.json").write_text(json.dumps({"stage": "flash", "steps": 7, "val_loss": 10.5}))
    return load_model(str(folder))


@contextlib.contextmanager
def serving(app):
    """`app` served by uvicorn on a free loopback port, in a thread: its base URL."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def post(server, body, **kw):
    import httpx

    return httpx.post(f"{server}/v1/completions", json=body, timeout=60, **kw)


def generating() -> int:
    return sum(t.name.startswith("generate-") for t in threading.enumerate())


def find_browser():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@contextlib.contextmanager
def headless_browser():
    """A selenium Chrome driver on Chromium, headless; skips the test where there is none."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    browser, driver_path = find_browser(), shutil.which("chromedriver")
    if not browser or not driver_path:
        pytest.skip("no Chromium and chromedriver on this machine (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def generate_in_page(driver, prompt_text="ROMEO:"):
    """Type a prompt, press Generate, wait for the status line to say done."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    prompt = driver.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(prompt_text)
    driver.find_element(By.ID, "seed").send_keys("1")
    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "status").text.startswith("done"))
    assert driver.find_element(By.ID, "completion").text.strip()
    assert driver.find_element(By.ID, "output").text.startswith(prompt_text)


def fake_gpu(monkeypatch, capability, name):
    """The run's device resolved to a CUDA GPU of this compute capability and name (no GPU needed)."""
    import torch

    import gpt2.training.devices

    monkeypatch.setattr(gpt2.training.devices, "resolve_device", lambda requested, ranks: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
