"""One Hydra job around the loop: its run folder, summary.json and failures, the sweep callbacks, the SLURM
launchers, and a trained model loaded back from a run folder for the commands."""
