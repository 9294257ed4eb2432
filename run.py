"""The one entrypoint: `python run.py +stage=flash [key=value ...]`, a sweep with -m or +sweep=speedup,
data-parallel with `torchrun --nproc_per_node=N run.py ...`. The config (conf/, gpt2/config.py) says
what to build; gpt2/train.py builds it and runs the loop."""

import sys

import hydra

from gpt2 import distributed
from gpt2.config import check_command_line, register_configs
from gpt2.errors import UsageError

# torch takes 1-2 s to import: it loads when a run starts (main, the run's Hydra callbacks), never for
# `--help`, `--cfg` or a TAB completion (Hydra's -sc), which only compose the config (gpt2.config is torch-free)
register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    from gpt2 import job
    from gpt2.train import train

    job.run_job(cfg, train)


def exit_code() -> int:
    job = sys.modules.get("gpt2.job")  # absent when nothing ran (--cfg, a completion query)
    return job.exit_code() if job else 0


if __name__ == "__main__":
    sys.argv += distributed.hydra_overrides_for_rank(distributed.ranks_from_env())
    try:
        check_command_line(sys.argv[1:])
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    try:
        main()
    except KeyboardInterrupt:  # a signal during set-up, or a second Ctrl-C; summary.json says "interrupted"
        print("interrupted: stopped at once; nothing was saved after the last checkpoint", file=sys.stderr)
        sys.exit(130)
    sys.exit(exit_code())
