"""What a benchmark of experiments/ records beside its figures, in its results.json: the exact command, the
machine and the versions, so that every figure a README quotes can be traced to a committed raw file (and
tests/test_figures.py checks that it is). Imported by the bench scripts, which put this folder on sys.path."""

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    import torch

    return {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def command() -> str:
    """The command line that ran this script, as typed from the repository root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


def write(path, results: dict) -> Path:
    """results.json at path: the command, the date and the machine first, then the bench's own figures."""
    path = Path(path)
    record = {"command": command(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), **results}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)  # a run stopped while writing leaves the previous results.json whole
    return path
