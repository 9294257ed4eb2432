"""The training loop (loop.py) and what it uses: one run's state, the optimizer and schedule, step figures and
MFU, checks before the start, checkpoints, stop signals, the device and torch flags, wandb."""
