"""The training command, `python run.py ...` or, from any folder, `gpt2-train ...` (pyproject's
[project.scripts]; the other gpt2-* commands there are each module's own `main`): a run `+stage=flash
[key=value ...]`, a sweep with -m or +sweep=speedup, data-parallel with torchrun. The config (conf/,
gpt2/config.py) says what to build; gpt2/training/loop.py builds it and runs the loop."""

import os
import sys
from pathlib import Path

import hydra

from gpt2 import distributed
from gpt2.config import check_command_line, register_configs
from gpt2.errors import UsageError, print_error

# conf/ lives at the repository's top level (DESIGN.md), beside gpt2/, and is not packaged: the editable install
# of the README (`pip install -e .`) runs the package from the repository, so it is found from any folder. A
# plain `pip install .` copies gpt2/ alone into site-packages and is refused in one line instead of made to work:
# shipping conf/ there (package data, Hydra's pkg://) would make two copies of every stage to keep in step, and
# the rest of the workflow lives in the repository anyway (gpt2.bench runs its run.py and reads its conf/,
# tests/, experiments/), so a copied install would only half work.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# torch takes 1-2 s to import: it loads when a run starts (run_training, the run's Hydra callbacks), never for
# `--help`, `--cfg` or a TAB completion (Hydra's -sc), which only compose the config (gpt2.config is torch-free)
register_configs()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def run_training(cfg) -> None:
    from gpt2.runs import job
    from gpt2.training.loop import train

    job.run_job(cfg, train)


def exit_code() -> int:
    job = sys.modules.get("gpt2.runs.job")  # absent when nothing ran (--cfg, a completion query)
    return job.exit_code() if job else 0


def check_conf_dir() -> None:
    if not (CONF_DIR / "config.yaml").is_file():
        raise UsageError(f"no Hydra configs at {CONF_DIR}: gpt2-speedrun runs from its repository, so install "
                         "it editable from there: pip install -e .")


def train_main() -> int:
    """`gpt2-train` and `python run.py`: the exit code of the run (or sweep); 2 for bad input, 130 on Ctrl-C."""
    sys.argv += distributed.hydra_overrides_for_rank(distributed.ranks_from_env())
    try:
        check_conf_dir()
        check_command_line(sys.argv[1:])
    except UsageError as e:
        return print_error(e)
    try:
        run_training()
    except KeyboardInterrupt:  # a signal during set-up, or a second Ctrl-C; summary.json says "interrupted"
        print("interrupted: stopped at once; nothing was saved after the last checkpoint", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout left (`gpt2-train --help | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush cannot fail
        return 1
    return exit_code()
