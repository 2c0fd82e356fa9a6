"""Output folders that appear whole or not at all: the ``.partial`` sibling, the writer lock, atomic JSON."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
PARTIAL_SUFFIX = ".partial"
# written into every ``.partial`` work folder this project makes, before anything else: only a folder that
# carries it (or an empty one) is resumed, cleared or moved into place, never a user's own ``<out>.partial``
PARTIAL_MARKER = ".safetypairs-partial"


class OutputDirError(OSError):
    """An output folder cannot be used: not a folder, not writable, not empty without overwrite, or an input."""


class RunLockedError(OutputDirError):
    """Another live process is writing the same run folder."""


def partial_dir(out: Path) -> Path:
    """The sibling folder an unfinished run works in."""
    return out.with_name(out.name + PARTIAL_SUFFIX)


def output_folder(out: str | os.PathLike) -> Path:
    """The folder a command writes for ``out``: ``out`` itself, or, when ``out`` is a symbolic link, the folder it
    points to (the link stays a link and reads the new folder; its work sibling lies next to the target)."""
    path = Path(out)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def open_partial(out: Path) -> Path:
    """Create ``out``'s ``.partial`` work folder, or take over one this project made (it carries `PARTIAL_MARKER`).

    Returns:
        The work folder, marked as this project's.

    Raises:
        OutputDirError: when the ``.partial`` path is not a folder, or is a non-empty folder without the
            marker (someone else's files: nothing in it is touched), or cannot be created.
    """
    work = partial_dir(out)
    if work.exists() and not work.is_dir():
        raise OutputDirError(f"{str(work)!r} exists and is not a folder; move or delete it, or choose another --out")
    if work.is_dir() and not (work / PARTIAL_MARKER).is_file() and any(work.iterdir()):
        raise OutputDirError(f"{str(work)!r} holds files safetypairs did not write (it has no {PARTIAL_MARKER} "
                             "marker); nothing in it was touched: move or delete it, or choose another --out")
    try:
        work.mkdir(parents=True, exist_ok=True)
        (work / PARTIAL_MARKER).touch()
    except OSError as err:
        raise OutputDirError(f"cannot write next to output folder {str(out)!r}: {err.strerror or err}") from err
    return work


def finish_partial(work: Path, out: Path, keep: tuple[str, ...] = ()) -> list[str]:
    """Move a complete work folder into place as ``out``: its lock and marker dropped, then `replace_dir`.

    Returns:
        The names in ``keep`` that were carried over from the replaced ``out``.
    """
    release_lock(work)
    (work / PARTIAL_MARKER).unlink(missing_ok=True)
    return replace_dir(work, out, keep)


def check_not_input(out: str | Path, inputs: tuple[str | Path, ...]) -> None:
    """Refuse an output folder that is an input, contains one or lies inside one (writing or replacing it
    would destroy or pollute the input).

    Raises:
        OutputDirError: naming the input.
    """
    target = Path(out).resolve()
    for given in inputs:
        path = Path(given).resolve()
        if path == target or target in path.parents or path in target.parents:
            raise OutputDirError(f"--out {str(out)!r} is the input {str(given)!r}, contains it or lies inside it; "
                                 "choose another folder")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- locks and atomic folders


def acquire_lock(folder: Path) -> None:
    """Take ``folder``'s writer lock; a lock left by a dead process on this host is taken over.

    Raises:
        RunLockedError: when a live process (or one on another host) holds it.
    """
    path = folder / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": utc_now()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_json(path) or {}
            if not _stale(holder):
                raise RunLockedError(
                    f"{str(folder)!r} is being written by another safetypairs process (pid {holder.get('pid')} on "
                    f"{holder.get('host')!r} since {holder.get('since')}); wait for it, or delete "
                    f"{str(path)!r} if that process is gone") from None
            logger.warning("taking over the stale lock of dead process %s in %s", holder.get("pid"), folder)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(me, handle)
        return
    raise RunLockedError(f"could not take the lock {str(path)!r}")


def _stale(holder: dict[str, Any]) -> bool:
    """A lock is stale when its process is gone (only knowable on the same host)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return not holder  # an unreadable lock file is a crash mid-write
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def release_lock(folder: Path) -> None:
    """Drop ``folder``'s writer lock (if this process holds it)."""
    path = folder / LOCK_FILE
    holder = read_json(path) or {}
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def replace_dir(src: Path, dst: Path, keep: tuple[str, ...] = ()) -> list[str]:
    """Move the finished folder ``src`` to ``dst``, replacing what was there, never leaving a mix.

    Args:
        src: the complete new folder.
        dst: the folder to replace (may be missing).
        keep: names of files in ``dst`` that carry over into the new folder (work made beside the data,
            such as human review decisions); one ``src`` already holds is not replaced. A kept file is
            hard-linked, so a write to it while the folders swap lands in the kept file too.

    Returns:
        The names in ``keep`` that were carried over.
    """
    kept = [name for name in keep if (dst / name).is_file() and not (src / name).exists()]
    for name in kept:
        try:
            os.link(dst / name, src / name)
        except OSError:  # a file system without hard links
            shutil.copy2(dst / name, src / name)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return kept


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse an output path that is not a folder, or a non-empty folder without ``overwrite``.

    Raises:
        OutputDirError: naming the path and the way out.
    """
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output path {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputDirError(f"output folder {str(out)!r} is not empty; pass --overwrite to replace it")


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool, inputs: tuple[str | Path, ...] = ()) -> Iterator[Path]:
    """Write a whole output folder or nothing: yields a locked temporary sibling, renamed into place on success.

    Args:
        out: the final folder (a symbolic link to a folder is written through: `output_folder`).
        overwrite: replace a non-empty ``out`` (only once the new one is complete).
        inputs: input paths ``out`` must not be or contain.

    Yields:
        The temporary folder to write into.

    Raises:
        OutputDirError: when ``out`` is an input, not a folder, non-empty without ``overwrite``,
            not writable, or being written by another process, or when ``<out>.partial`` holds files this
            project did not write (`open_partial`).
    """
    out = output_folder(out)
    check_not_input(out, inputs)
    check_output_folder(out, overwrite)
    tmp = open_partial(out)
    acquire_lock(tmp)
    for stale in tmp.iterdir():  # leftovers of a failed earlier attempt of ours: this folder has no resume
        if stale.name not in (LOCK_FILE, PARTIAL_MARKER):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finish_partial(tmp, out)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's object, or ``None`` when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON atomically (a killed run never leaves a half-written file under the final name)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str), encoding="utf-8")
    os.replace(tmp, path)
