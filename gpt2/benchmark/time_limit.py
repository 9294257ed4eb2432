"""One way to run a child process under a time limit, for the bench's phases and its peers."""

import os
import signal
import subprocess
from typing import Optional


def wait_within(proc: subprocess.Popen, limit_s: float, grace_s: float, *, whole_group: bool) -> Optional[int]:
    """proc's exit code, or None when it ran past limit_s: then SIGTERM (to its process group, or, with
    whole_group=False, to the process alone, so that a run finishes its step while its compile workers keep
    going) and, grace_s later, SIGKILL to the group. proc must lead its own session (start_new_session=True).
    Our own Ctrl-C or any other exception while waiting takes the child down with us."""
    try:
        return proc.wait(timeout=max(limit_s, 1))
    except subprocess.TimeoutExpired:
        if whole_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return None  # "timed out", whatever the child's own exit code after the signal
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
