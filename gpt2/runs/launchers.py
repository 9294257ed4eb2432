"""What our submitit launchers (hydra_plugins/gpt2_speedrun_launchers.py, named by conf/hydra/launcher/*.yaml)
add to Hydra's: cancel what they submitted when the submitting command is stopped (Ctrl-C or SIGTERM while it
waits for the jobs), and write the report when a job was killed without a result. Without it the jobs would go
on running, or wait in the queue, with no one left to write the sweep's report; and the plugin gives up on the
whole sweep, report and all, at the first job killed hard. Every option of the plugin's SlurmLauncher and
LocalLauncher is kept: nothing else changes."""

import signal
import sys
import time
from unittest import mock

CANCEL_WAIT_S = 90  # how long the cancelled jobs get to save their step and write summary.json (SLURM: KillWait)


def _sigterm_as_ctrl_c(signum, frame):
    raise KeyboardInterrupt


class CancelOnInterrupt:
    """A mixin for the plugin's launchers (BaseSubmititLauncher): their launch(), and a cancel on interrupt."""

    def launch(self, job_overrides, initial_job_idx):
        # The plugin's launch() submits the jobs (executor.map_array) and then blocks in job.results(), holding
        # the jobs in a local variable. Rather than copy its 60 lines to reach them, record what map_array
        # returns for the length of this one call (the submitting process submits from this thread only).
        import submitit

        submitted = []
        map_array = submitit.AutoExecutor.map_array

        def recording_map_array(executor, fn, *iterables):
            jobs = map_array(executor, fn, *iterables)
            submitted.extend(jobs)
            return jobs

        previous = signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)  # scancel / kill of the submitting side
        try:
            with mock.patch.object(submitit.AutoExecutor, "map_array", recording_map_array):
                return super().launch(job_overrides, initial_job_idx)
        except KeyboardInterrupt:
            self._cancel(submitted)  # exits; a Ctrl-C during the submission itself cancels nothing (no ids yet)
        except submitit.core.utils.UncompletedJobError as e:  # a job killed hard: SIGKILL, out of memory, node lost
            # the plugin stops waiting at the first such job; the others still run and their rows belong in the report
            print(f"a job of this sweep ended without a result ({str(e).splitlines()[0]}); waiting for the others, "
                  "then the report marks it", file=sys.stderr, flush=True)
            self._report_when_done(submitted, deadline=None)
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _cancel(self, jobs) -> None:
        """Cancel the jobs, give them a moment to stop (each saves its current step and writes summary.json
        "interrupted", as on a SIGTERM), then write the report as Hydra would have, and exit non-zero."""
        for j in jobs:
            controller = getattr(j, "_process", None)  # submitit's LocalJob: the process that runs the job's tasks
            if controller is not None:
                # it passes SIGTERM on to the tasks and waits for them; on the SIGINT of LocalJob.cancel it kills
                # them 1 s later, before they have saved their step
                controller.send_signal(signal.SIGTERM)
            else:
                j.cancel(check=False)  # SLURM: scancel (SIGTERM, later SIGKILL)
        print(f"interrupted: cancelled the {len(jobs)} job(s) this sweep submitted "
              f"({', '.join(str(j.job_id) for j in jobs) or 'none yet'}); the report covers what they saved",
              file=sys.stderr, flush=True)
        self._report_when_done(jobs, deadline=time.monotonic() + CANCEL_WAIT_S)

    def _report_when_done(self, jobs, deadline) -> None:
        """Wait for the jobs (until `deadline`, if any), then write the report as Hydra would have, and exit
        non-zero: the failure count comes from the jobs' summary.json files."""
        from gpt2.runs import job

        while (deadline is None or time.monotonic() < deadline) and not all(j.done() for j in jobs):
            time.sleep(0.5)  # a (second) Ctrl-C stops this wait, and the report with it
        # Hydra calls on_multirun_end only when launch() returns: the report and the failure count from the
        # jobs' summary.json files (hydra_callbacks.SpeedrunCallbacks), so that the exit code says what happened
        self.hydra_context.callbacks.on_multirun_end(config=self.config)
        sys.exit(max(job.exit_code(), 1))

