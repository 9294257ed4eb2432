"""The launchers that conf/hydra/launcher/slurm_gpu.yaml and local_cpu.yaml name: Hydra's submitit launchers,
which also cancel the jobs they submitted on Ctrl-C (gpt2/runs/launchers.py). They live here because Hydra loads
launchers only from the hydra_plugins package (hydra.core.plugins): it imports this module on every start, so it
stays light (no torch), and defines nothing without the plugin (pip install -e ".[cluster]")."""

try:
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher as plugin
except ImportError:
    plugin = None

if plugin is not None:
    from gpt2.runs.launchers import CancelOnInterrupt

    class SlurmLauncher(CancelOnInterrupt, plugin.SlurmLauncher):
        pass

    class LocalLauncher(CancelOnInterrupt, plugin.LocalLauncher):
        pass
