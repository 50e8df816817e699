"""Safe file operations shared by the stage runners: atomic writes, output-folder locks, and :func:`source_hash`,
the identity of what produced a set of rows (cached evaluation scores, study pages).

**Atomic writes.** Every file pgot writes that another process or a later run reads (store shards and
``meta.json``, ``scores.parquet``, ``trainer_state.json``, PNGs, agent records) is written to a temporary file in
the same folder and renamed over the target with ``os.replace``, which POSIX makes atomic: a reader sees the old
file or the new one, never a half-written one, and a process killed mid-write leaves at most a
``.<name>.<pid>.<token>.tmp`` file behind (:func:`remove_temporaries` clears them).

**Folder locks.** A run folder (``train.output_dir``), a frontier store (``precompute.store``) and an evaluation
folder (``eval.output_dir``) each belong to one pgot process at a time: :func:`hold_folder` takes an exclusive
lock on ``<folder>/.pgot.lock`` (:class:`filelock.FileLock`: ``flock`` where the file system has it, a soft
lock file with stale-owner recovery where it does not) and records the holder (host, pid, start time, command)
in ``<folder>/.pgot.lock.json``. A second process gets a :class:`FolderLockedError` naming the holder. The
operating system releases the lock when its holder dies, however it dies; the record a killed holder leaves
behind is taken over with a warning that names it. Under ``accelerate launch`` only the main process holds the
lock; the others wait for it at a collective and stop with the same error when it cannot be taken.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shlex
import shutil
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import filelock
from accelerate.utils import broadcast_object_list

from pgot.devices import every_process

if TYPE_CHECKING:
    import pandas as pd
    from accelerate import Accelerator

log = logging.getLogger(__name__)

__all__ = [
    "LOCK_FILE",
    "LOCK_RECORD",
    "FolderLock",
    "FolderLockedError",
    "folder_in_use",
    "Holder",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_parquet",
    "atomic_write_text",
    "hold_folder",
    "read_holder",
    "remove_temporaries",
    "source_hash",
    "temporary_name",
]


def temporary_name(path: str | Path) -> Path:
    """A new temporary sibling ``.<name>.<pid>.<token>.tmp`` for :func:`atomic_write` to write before renaming.

    The random token keeps two writers of one file apart where the pid does not: processes of several machines on
    a shared file system (containers repeat pids), threads of one process."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], Any], *, fsync: bool = True) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary sibling, which then replaces ``path``.

    Args:
        path: the target file; its folder is created when missing.
        write: called with the temporary path; must create that file.
        fsync: flush the temporary file to disk before the rename (survives a power cut, not only a kill).

    Returns:
        ``path``.

    Raises:
        OSError: the folder cannot be created or written; the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (with a trailing newline) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_write_parquet(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a DataFrame as parquet (no index) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def remove_temporaries(*folders: str | Path) -> int:
    """Delete the ``.*.tmp`` files a killed writer left in ``folders`` (not recursive); returns how many."""
    n = 0
    for folder in map(Path, folders):
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                if p.is_file():
                    p.unlink(missing_ok=True)
                    n += 1
    return n


def source_hash(obj: Any) -> str:
    """A 16-hex-digit hash of a JSON-able object (keys sorted; other objects by ``str``): what produced a set of rows."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Output-folder locks
# --------------------------------------------------------------------------------------------

LOCK_FILE = ".pgot.lock"
"""The file :class:`FolderLock` locks inside a folder (kept after release, so every process locks the same inode)."""
LOCK_RECORD = ".pgot.lock.json"
"""The holder record next to it: written once the lock is held, removed when it is released."""
_WAIT_POLL_S = 10.0  # a waiting main process reports to the other processes this often (collectives never time out)
GRACE_S = 2.0
"""How long a lock found taken is waited for before it counts as held: :func:`folder_in_use` (a preflight) takes
it for an instant to look, and that instant, stretched by a busy machine, must not pass for a run holding it."""


class FolderLockedError(ValueError):
    """Another process holds the folder's lock (a user error: the CLI prints it as one line and exits with 2)."""


@dataclass
class Holder:
    """Who holds a folder: what :data:`LOCK_RECORD` contains."""

    host: str
    pid: int
    started: str
    """When the lock was taken, ISO 8601 UTC."""
    command: str
    """The holder's command line."""

    @classmethod
    def me(cls) -> Holder:
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            command=shlex.join(getattr(sys, "orig_argv", sys.argv)),  # the exact command line, interpreter included
        )

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started}: {self.command}"

    def alive(self) -> bool | None:
        """Whether the holder process still exists: True / False on this host, None on another host (unknown)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else
            return True
        return True


def read_holder(folder: str | Path) -> Holder | None:
    """The holder record of ``folder``, or None when there is none or it is unreadable (a crash mid-write)."""
    try:
        data = json.loads((Path(folder) / LOCK_RECORD).read_text())
        return Holder(
            host=str(data["host"]), pid=int(data["pid"]), started=str(data["started"]), command=str(data["command"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


class FolderLock:
    """An exclusive, inter-process lock on a folder, with a record of its holder.

    Args:
        folder: the folder; created when missing.
        key: the config key that names the folder, as typed (``train.output_dir``), for the errors.
        what: what the holder does there, for the errors (``a pgot-train run``).

    Use :meth:`acquire` / :meth:`release`, or ``with FolderLock(...):`` (acquire, waiting only :data:`GRACE_S`).
    """

    def __init__(self, folder: str | Path, *, key: str, what: str):
        self.folder = Path(folder)
        self.key = key
        self.what = what
        self.holder: Holder | None = None  # ours, while held
        self._lock: filelock.BaseFileLock | None = None

    @property
    def held(self) -> bool:
        return self.holder is not None

    def acquire(self, timeout: float = 0) -> FolderLock:
        """Take the lock, waiting at most ``timeout`` seconds, and at least :data:`GRACE_S` (0: fail when it is
        still taken after the grace).

        Returns:
            self.

        Raises:
            FolderLockedError: another process holds it; the message names the holder and what to do.
            ValueError: the folder cannot be created or written (a file is in the way, no permission).
        """
        assert not self.held, f"{self.folder} is already locked by this FolderLock"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock = filelock.FileLock(str(self.folder / LOCK_FILE))
            self._lock.acquire(timeout=max(timeout, GRACE_S))
        except filelock.Timeout:
            raise FolderLockedError(self._locked_message()) from None
        except (FileExistsError, NotADirectoryError) as exc:
            raise ValueError(
                f"{self.key}={self.folder} cannot be used as a folder: {exc.strerror or exc} ({exc.filename}). "
                f"Set {self.key} to a folder path."
            ) from None
        except PermissionError as exc:
            raise ValueError(
                f"{self.key}={self.folder} is not writable ({exc.strerror or exc}: {exc.filename}). "
                f"Set {self.key} to a folder you can write to."
            ) from None
        try:
            self._take_over(read_holder(self.folder))
            self.holder = Holder.me()
            atomic_write_json(self.folder / LOCK_RECORD, asdict(self.holder), indent=1)
        except BaseException:
            self.holder = None
            self._lock.release()
            raise
        return self

    def release(self) -> None:
        """Remove the holder record and release the lock (nothing when not held)."""
        if not self.held:
            return
        try:
            (self.folder / LOCK_RECORD).unlink(missing_ok=True)
        finally:
            self.holder = None
            self._lock.release()

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _take_over(self, previous: Holder | None) -> None:
        """Warn about the record of a holder that is gone (it died without releasing; the OS freed the lock)."""
        if previous is None:
            return
        alive = previous.alive()
        state = {
            False: "which is gone",
            True: "which no longer holds it",
            None: "on another host, which no longer holds it",
        }
        log.warning(
            "%s=%s: took over the lock left by %s (%s, %s)",
            self.key, self.folder, self.what, previous.describe(), state[alive],
        )  # fmt: skip

    def _locked_message(self) -> str:
        holder = read_holder(self.folder)
        who = f"another process ({holder.describe()})" if holder else "another process (its record is not written yet)"
        return (
            f"{self.key}={self.folder} is in use by {who}. Two processes writing one folder would mix their files: wait "
            f"for it to finish, or set {self.key} to another folder. The lock ({self.folder / LOCK_FILE}) is released "
            "when its holder exits, however it exits."
        )


def folder_in_use(folder: str | Path, *, key: str, what: str) -> str | None:
    """Whether another process holds ``folder``'s lock now (a check for the preflight).

    It takes the lock for an instant to look (flock has no test-only call); a lock found taken is waited for
    :data:`GRACE_S` first, so that two processes looking at once do not see each other as holders.

    Returns:
        The message :class:`FolderLock` would raise, naming the holder; None when the folder is free or absent.
    """
    folder = Path(folder)
    if not (folder / LOCK_FILE).is_file():
        return None
    probe = filelock.FileLock(str(folder / LOCK_FILE))
    try:
        probe.acquire(timeout=GRACE_S)
    except filelock.Timeout:
        return FolderLock(folder, key=key, what=what)._locked_message()
    except OSError:
        return None  # not readable or writable: the folder check says so
    probe.release()
    return None


@contextmanager
def hold_folder(
    folder: str | Path,
    *,
    key: str,
    what: str,
    accelerator: Accelerator | None = None,
    wait: bool = False,
    scratch: Sequence[str] = (),
) -> Iterator[FolderLock | None]:
    """Hold ``folder``'s :class:`FolderLock` for the duration of the block; a collective under accelerate.

    Only the main process takes the lock. Every process leaves the call together, after the main process has
    taken the lock (a broadcast: nobody races ahead into the folder), or with the same error when it could not
    (an ``OSError`` of the main process's file system is raised there as it came, and as a ``ValueError`` naming it
    on the others).

    **A refused run leaves no trace.** When the block raises a ``ValueError`` (a user mistake found after the
    folder was taken) and the run wrote nothing but ``scratch`` (what it writes before any result, e.g. its
    ``config.yaml``), the main process removes what this call and the block created: the new ``scratch`` entries
    and temporaries, and, in a folder this call created, the lock files, the folder and the parents it created. A
    folder's entries that existed before are never touched, and a run that wrote a result (scores, a
    checkpoint, anything outside ``scratch``) keeps everything: nothing is lost.

    Args:
        folder: the output folder.
        key: its config key, as typed (``train.output_dir``, ``precompute.store``, ``eval.output_dir``).
        what: what the holder does there (``a pgot-train run``), for the messages.
        accelerator: the run's accelerator when several processes share the folder; None for one process.
        wait: wait (reporting the holder every few seconds) instead of failing when another process holds it.
        scratch: names (in ``folder``) the run writes before any result, removed again when it is refused.

    Yields:
        The held lock on the main process, None on the others.

    Raises:
        FolderLockedError: on every process, when another process holds the folder and ``wait`` is False.
        ValueError: on every process, when the folder cannot be created or written.
        OSError: on the main process, when its file system fails otherwise (the others raise a ``ValueError``).
    """
    main = accelerator is None or accelerator.is_main_process
    lock = FolderLock(folder, key=key, what=what) if main else None
    before = None
    failure: OSError | None = None  # the file system failed on the main process: raised there as it came
    told = False
    while True:
        status: tuple[str, str] = ("ok", "")
        if lock is not None:
            try:
                if before is None:
                    before = _entries(folder)
                lock.acquire(timeout=_WAIT_POLL_S if wait else 0)
            except FolderLockedError as exc:
                status = ("wait" if wait else "locked", str(exc))
            except ValueError as exc:
                status = ("error", str(exc))
            except OSError as exc:  # no space for the record, a read-only or failing disk: every process stops
                failure = exc
                status = ("error", f"{key}={folder}: the main process could not take the folder ({exc!r}).")
        status = _share(accelerator, status)
        if failure is not None:
            raise failure
        if status[0] != "wait":
            break
        if main and not told:
            log.info("waiting for the lock: %s", status[1])
            told = True
    if status[0] in ("locked", "error"):
        error = (FolderLockedError if status[0] == "locked" else ValueError)(status[1])
        raise every_process(error) if accelerator is not None else error
    refused = False
    try:
        yield lock
    except ValueError:
        refused = True
        raise
    finally:
        if lock is not None:
            lock.release()
            if refused and before is not None:
                _undo(Path(folder), before, scratch)


def _entries(folder: str | Path) -> tuple[list[Path], set[str]] | None:
    """(the missing folders from ``folder`` up, its entries) before a run; the missing list is empty when it
    exists."""
    path = Path(folder).expanduser().absolute()
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing, (set(os.listdir(path)) if not missing and path.is_dir() else set())


def _undo(folder: Path, before: tuple[list[Path], set[str]], scratch: Sequence[str]) -> None:
    """Remove what a refused run created in ``folder`` (see :func:`hold_folder`); keep everything when it wrote a
    result."""
    missing, old = before
    created = bool(missing)
    if not folder.is_dir():
        return
    new = set(os.listdir(folder)) - old
    ours = set(scratch) | ({LOCK_FILE, LOCK_RECORD} if created else set())
    temporary = {n for n in new if n.startswith(".") and n.endswith(".tmp")}
    if new - ours - temporary:
        return  # a result (or something another process wrote): nothing is removed
    for name in sorted(new):
        path = folder / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove %s after the refused run: %s", path, exc)
    for path in missing:  # the folder first, then the parents this run created
        try:
            path.rmdir()
        except OSError:
            break  # not empty (or gone): what is left is not ours


def _share(accelerator: Accelerator | None, status: tuple[str, str]) -> tuple[str, str]:
    """The main process's ``status`` on every process (a broadcast, so also a barrier)."""
    if accelerator is None or accelerator.num_processes == 1:
        return status
    box = [list(status)]
    broadcast_object_list(box, from_process=0)
    return box[0][0], box[0][1]
