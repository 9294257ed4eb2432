"""The one entrypoint: `python run.py +stage=flash [key=value ...]`, a sweep with -m or +sweep=speedup,
data-parallel with `torchrun --nproc_per_node=N run.py ...`. The same command as `gpt2-train`, which works
from any folder after `pip install -e .`: both are gpt2/cli.py's train_main (Hydra's entrypoint)."""

import sys

from gpt2.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
