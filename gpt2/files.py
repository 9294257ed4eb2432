"""Files the project writes and fetches: atomic writes, the cache folder, downloads. One owner for each.

- `atomic_write_bytes`: checkpoints, summaries, token caches, shards, manifests and downloads are written to
  a temporary file beside their name and renamed over it, so a kill mid-write never leaves half a file. By
  hand: the library for it (`atomicwrites`) is archived by its author, and the project needs two things no
  wrapper gives (a KeyboardInterrupt or a full disk raised as itself out of torch.save's writer, see below).
- `cache_root`: the project's cache folder (GPT2_SPEEDRUN_CACHE, else ~/.cache/gpt2-speedrun), as the config's
  `data.cache_dir` resolves it.
- `download`: the bytes at a URL, or a one-line UsageError that says why and what to do instead. urllib, not
  requests or huggingface_hub: two small files (Tiny Shakespeare, HellaSwag's validation set) from GitHub,
  checked by their caller's checksum; the hub's datasets go through `datasets` (gpt2/prepare.py).
"""

import errno
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from gpt2.errors import UsageError

log = logging.getLogger("gpt2.files")


def cache_root() -> Path:
    """The project's cache folder (GPT2_SPEEDRUN_CACHE or ~/.cache/gpt2-speedrun); created by whoever writes."""
    return Path(os.path.expanduser(os.environ.get("GPT2_SPEEDRUN_CACHE", "~/.cache/gpt2-speedrun")))


def download(url: str, what: str, instead: str) -> bytes:
    """The bytes at `url`; a failure is one line naming `what` and the reason, then `instead` (what to do)."""
    log.info("downloading %s from %s", what, url)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts, a malformed url
        # "HTTP Error 404: Not Found", "[Errno 111] Connection refused", "timed out", ...
        reason = e.reason if type(e) is urllib.error.URLError else e
        raise UsageError(f"could not download {what} from {url} ({reason}); {instead}") from None


class _WatchedFile:
    """A file whose write() remembers what it raised: torch.save turns a KeyboardInterrupt or an OSError
    (disk full) inside its writer into "RuntimeError: unexpected pos", which would hide both."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except BaseException as e:
            self.error = self.error or e
            raise

    def flush(self):
        return self.f.flush()


def _no_space(path: Path, e: OSError) -> OSError:
    where = f"{path.parent} (writing {path.name})"
    return OSError(e.errno, f"no space left on the device of {where}; the previous {path.name} is kept. "
                            "Free some space, or point the run elsewhere (hydra.run.dir=...)")


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(file) on a temporary file beside `path`, then rename it over `path`.

    A reader sees the old file or the new one, never half of one: a process killed mid-write leaves the
    previous checkpoint (or summary) intact and only a stray temporary file behind; an interrupt or an error
    during the write removes the temporary file and is raised as what it is (KeyboardInterrupt, a clear
    "no space left" OSError), not as the writer's own complaint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    watched = None
    try:
        with os.fdopen(fd, "wb") as f:
            watched = _WatchedFile(f)
            write(watched)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = (watched.error if watched is not None else None) or e.__context__ or e
        if isinstance(cause, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            raise _no_space(path, cause) from None
        raise
