"""What stops a job, and how: in one place for the training loop (after the step in flight) and the job
around it (at once, outside the steps). Both only ever set or raise; they never write a file themselves.

- Ctrl-C (SIGINT): inside the steps, stop after the step in flight and save; a second Ctrl-C stops at once.
- SIGTERM: a kill, `scancel`, torchrun stopping its workers; SIGHUP: the terminal or ssh session closed;
  SIGUSR1: SLURM's warning before a time limit (--signal=USR1@120); SIGUSR2: the same warning as submitit asks
  SLURM for it (the jobs of a sweep on hydra/launcher=slurm_gpu). Inside the steps as a first Ctrl-C; outside
  them (set-up, the summary) at once, as a Ctrl-C, with summary.json saying "interrupted".
"""

import contextlib
import logging
import signal

log = logging.getLogger("gpt2.training.loop")  # the loop's logger: "stopping after this step" belongs to its run.log

JOB_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGINT, *JOB_STOP_SIGNALS)


@contextlib.contextmanager
def _handlers(signals, handler):
    """`handler` for `signals` inside the block, the previous handlers after it."""
    previous = {}
    with contextlib.suppress(ValueError):  # signal handlers can only be set from the main thread
        for sig in signals:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _stop_at_once(signum, frame):
    raise KeyboardInterrupt


def sigterm_stops_at_once():
    """SIGTERM, SIGHUP, SIGUSR1 or SIGUSR2 outside the training steps (set-up, the summary) stops like a Ctrl-C
    there: at once, but with summary.json saying "interrupted". Inside the steps and the final validation
    StopFlag finishes what is in flight and saves."""
    return _handlers(JOB_STOP_SIGNALS, _stop_at_once)


class StopFlag:
    """Ctrl-C, SIGTERM, SIGHUP, SIGUSR1 or SIGUSR2 asks the loop to stop after the current step (or the final
    validation) and save; a second Ctrl-C stops at once. Under torchrun the ranks agree (distributed.any_rank)
    after every step, so all stop at the same one, also when the signal reached only some of them."""

    def __init__(self):
        self.requested = False
        self._handlers = _handlers(STOP_SIGNALS, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning(f"{signal.Signals(signum).name}: stopping after this step (Ctrl-C again to stop now)")

    def __enter__(self):
        self._handlers.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handlers.__exit__(*exc)
