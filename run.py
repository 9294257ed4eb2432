"""The one entrypoint: `python run.py +stage=flash [key=value ...]`, a sweep with -m or +sweep=speedup,
data-parallel with `torchrun --nproc_per_node=N run.py ...`. The config (conf/, gpt2/config.py) says
what to build; gpt2/train.py builds it and runs the loop."""

import sys

import hydra

from gpt2 import distributed, job
from gpt2.errors import UsageError
from gpt2.train import train


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    job.run_job(cfg, train)


if __name__ == "__main__":
    sys.argv += distributed.hydra_overrides_for_rank(distributed.ranks_from_env())
    try:
        job.check_command_line(sys.argv[1:])
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    try:
        main()
    except KeyboardInterrupt:  # a signal during set-up, or a second Ctrl-C; summary.json says "interrupted"
        print("interrupted: stopped at once; nothing was saved after the last checkpoint", file=sys.stderr)
        sys.exit(130)
    sys.exit(job.exit_code())
