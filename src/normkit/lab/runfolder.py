"""The run folder: one writer under an OS lock, rows and checkpoints committed together, resume.

- **One writer.** :meth:`RunFolder.lock` takes an exclusive ``flock`` on ``.normkit.lock``; a
  second process refuses at once, naming the holder's pid. The OS drops the lock when its process
  dies, so a lock left by a killed run is taken over without anyone deleting anything. Workers
  (worker processes, Dask) never open the folder: the parent writes everything.
- **Commits.** A trial's rows are appended to metrics.jsonl (flushed and fsynced) and then its
  checkpoint is replaced atomically (``checkpoints/<trial>.pt``: its state and how many of its rows
  are committed); a finished trial's final row goes last and its checkpoint is removed.
- **Resume.** Rows beyond a trial's checkpoint (written before a kill, never committed) and the
  rows of trials without checkpoint or final row are dropped, as is a torn last line; an unreadable
  checkpoint restarts its trial from the beginning. Nothing is lost and nothing is duplicated.
- **Overwrite** deletes only a normkit run (config.json's schema) and only the files a run writes,
  never following a symbolic link out of the folder; anything else refuses in one line.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from normkit.lab.files import json_ready, write_atomic, write_json
from normkit.lab.records import (
    CHECKPOINTS,
    CONFIG,
    LEGACY_CHECKPOINT,
    LOCK,
    METRICS,
    RUN_FILES,
    TIMING,
    RunFolderError,
    is_run_config,
    read_json,
    read_rows,
)

CHECKPOINT_FORMAT = 2
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


@contextmanager
def writing(path: Path, resume_hint: str):
    """Turn a failed write (full disk, read-only folder) into one line naming the file and the fix."""
    try:
        yield
    except OSError as error:
        if error.errno in _DISK_FULL:
            raise RunFolderError(
                f"no space left on the device while writing {path}; free some space and continue "
                f"with {resume_hint} (what was committed before is kept)"
            ) from None
        if error.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise RunFolderError(
                f"cannot write {path} ({error.strerror}); make the folder writable and continue "
                f"with {resume_hint}"
            ) from None
        raise


def _exclusive(fd: int) -> None:
    """An exclusive, non-blocking OS lock on ``fd`` (flock; on Windows a lock on the 1st byte past
    the holder's note), released by the OS when the process ends; OSError when held."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        os.lseek(fd, 4096, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


@dataclass
class Restored:
    """What a resume starts from: finished trials' final rows, and for each trial in progress its
    committed row count, state (bytes) and training seconds."""

    finals: dict[str, dict] = field(default_factory=dict)
    committed: dict[str, int] = field(default_factory=dict)
    states: dict[str, bytes] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class RunFolder:
    def __init__(self, path: Path, resume_hint: str = "--resume"):
        self.path, self.resume_hint = path, resume_hint
        self._lock_fd: int | None = None
        self._metrics = None
        self._seconds: dict[str, float] = {}  # finished trials' training seconds (timing.json)

    # -- config ------------------------------------------------------------------------------
    def read_config(self) -> dict | None:
        """The folder's config.json (None without one); foreign or damaged ones refuse."""
        path = self.path / CONFIG
        if not path.is_file():
            return None
        config = read_json(path, "a run's configuration",
                           "move it away or choose another --out (nothing was changed)")  # fmt: skip
        if not is_run_config(config):
            raise RunFolderError(
                f"{path} was not written by normkit's lab; normkit only resumes or overwrites its own "
                "runs: choose another --out (nothing was changed)"
            )
        return config

    def foreign_files(self) -> list[str]:
        """Files in the folder other than the lock (a new run needs an empty or new folder)."""
        if not self.path.exists():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name != LOCK)

    def write_config(self, config: dict) -> None:
        with writing(self.path / CONFIG, self.resume_hint):
            write_json(self.path / CONFIG, config)

    # -- the lock ----------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the folder's lock, or refuse at once naming the process that holds it."""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"--out {self.path} is a file, not a folder; choose another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _exclusive(fd)
        except OSError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(
                f"{self.path} is being written by {holder}; wait for it to finish or stop it (one "
                "writer per run folder; the lock of a killed process is released by itself)"
            ) from None
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"normkit pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # -- overwrite ---------------------------------------------------------------------------
    def clear(self) -> None:
        """Delete the files a run writes (config.json is checked to be a normkit run's first);
        a symbolic link is removed itself, never followed; other files stay."""
        self.read_config()
        for name in RUN_FILES:
            path = self.path / name
            if path.is_symlink() or path.is_file():
                path.unlink()
        for folder, pattern in ((CHECKPOINTS, "*.pt"), ("figures", "*.png")):
            path = self.path / folder
            if path.is_symlink():
                path.unlink()
            elif path.is_dir():
                for child in path.glob(pattern):
                    if child.is_symlink() or child.is_file():
                        child.unlink()
                if not any(path.iterdir()):
                    path.rmdir()
        for leftover in self.path.glob(".*.tmp"):  # a write_atomic interrupted by a kill
            if leftover.is_symlink() or leftover.is_file():
                leftover.unlink()

    # -- commits -----------------------------------------------------------------------------
    def _checkpoint_path(self, key: str) -> Path:
        slug = re.sub(r"[^A-Za-z0-9=._-]+", "_", key)[:60]
        return self.path / CHECKPOINTS / f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.pt"

    def commit(self, key: str, rows: list[dict], state: bytes | None, committed: int,
               seconds: float) -> None:  # fmt: skip
        """Append ``rows`` (fsynced), then record the trial's checkpoint (``state``: bytes, with
        ``committed`` rows of the trial now on disk) or, when ``state`` is None, remove it."""
        path = self.path / METRICS
        with writing(path, self.resume_hint):
            if self._metrics is None:
                self._metrics = open(path, "ab")  # noqa: SIM115 (held open for the whole run)
            if rows:
                lines = "".join(json.dumps(json_ready(r), allow_nan=False) + "\n" for r in rows)
                self._metrics.write(lines.encode("utf-8"))
                self._metrics.flush()
                os.fsync(self._metrics.fileno())
        checkpoint = self._checkpoint_path(key)
        if state is None:
            self._seconds[key] = seconds
            with writing(self.path / TIMING, self.resume_hint):
                write_json(self.path / TIMING, self._seconds)
            checkpoint.unlink(missing_ok=True)
            return
        payload = {"format": CHECKPOINT_FORMAT, "trial": key, "rows": committed,
                   "seconds": seconds, "state": state}  # fmt: skip
        checkpoint.parent.mkdir(exist_ok=True)
        with writing(checkpoint, self.resume_hint):
            write_atomic(checkpoint, lambda p: torch.save(payload, p))

    def start_fresh(self) -> None:
        with writing(self.path / METRICS, self.resume_hint):
            (self.path / METRICS).write_bytes(b"")
        (self.path / TIMING).unlink(missing_ok=True)

    # -- resume ------------------------------------------------------------------------------
    def restore(self, echo: Callable[[str], None]) -> Restored:
        """Bring metrics.jsonl back to what the checkpoints record (see the module docstring)."""
        restored = Restored()
        checkpoints: dict[str, dict] = {}
        folder = self.path / CHECKPOINTS
        for path in sorted(folder.glob("*.pt")) if folder.is_dir() else []:
            try:
                payload = torch.load(path, weights_only=True)
                if payload.get("format") != CHECKPOINT_FORMAT or not isinstance(payload["state"], bytes):
                    raise ValueError(f"format {payload.get('format')}")
            except Exception as error:  # truncated, foreign, another format: restart that trial
                echo(f"note: {path} is unreadable ({type(error).__name__}); its trial restarts "
                     "from the beginning")  # fmt: skip
                path.unlink()
                continue
            checkpoints[payload["trial"]] = payload
        legacy = self.path / LEGACY_CHECKPOINT
        if legacy.exists():
            echo(f"note: {legacy} was written by an older normkit; its trial restarts from the beginning")
            legacy.unlink()
        path = self.path / METRICS
        rows = read_rows(path)
        finals = {r["trial"] for r in rows if r["kind"] == "final"}
        present: dict[str, int] = {}
        for row in rows:
            present[row["trial"]] = present.get(row["trial"], 0) + 1
        for key, payload in list(checkpoints.items()):
            if key in finals:
                del checkpoints[key]
                self._checkpoint_path(key).unlink(missing_ok=True)
            elif present.get(key, 0) < payload["rows"]:
                echo(f"note: {path} holds fewer rows of {key} than its checkpoint records (the file "
                     "was changed by hand); that trial restarts from the beginning")  # fmt: skip
                del checkpoints[key]
                self._checkpoint_path(key).unlink(missing_ok=True)
        kept, counts, seen_final = [], {}, set()
        for row in rows:
            key = row["trial"]
            if key in finals:
                if key in seen_final:
                    continue
                if row["kind"] == "final":
                    seen_final.add(key)
                kept.append(row)
            elif key in checkpoints and counts.get(key, 0) < checkpoints[key]["rows"]:
                counts[key] = counts.get(key, 0) + 1
                kept.append(row)
        self._rewrite_if_changed(rows, kept)
        restored.finals = {r["trial"]: r for r in kept if r["kind"] == "final"}
        timing = self.path / TIMING
        if timing.is_file():
            try:
                recorded = json.loads(timing.read_text())
            except json.JSONDecodeError:
                recorded = {}  # only the report's timing depends on it
            self._seconds = {k: v for k, v in recorded.items() if k in restored.finals}
            restored.seconds.update(self._seconds)
        for key, payload in checkpoints.items():
            restored.committed[key] = payload["rows"]
            restored.states[key] = payload["state"]
            restored.seconds[key] = payload["seconds"]
        return restored

    def _rewrite_if_changed(self, before: list[dict], after: list[dict]) -> None:
        path = self.path / METRICS
        text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in after)
        if after == before and (not path.exists() or path.stat().st_size == len(text.encode())):
            return
        with writing(path, self.resume_hint):
            write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))

    def reorder(self, keys: list[str]) -> None:
        """Rewrite metrics.jsonl with the trials in plan order (each trial's rows in their order),
        so a finished run's file is the same whichever executor ran it."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        rows = read_rows(self.path / METRICS)
        order = {key: index for index, key in enumerate(keys)}
        ordered = sorted(rows, key=lambda r: order.get(r["trial"], len(order)))
        if ordered != rows:
            self._rewrite_if_changed(rows, ordered)
        folder = self.path / CHECKPOINTS
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
