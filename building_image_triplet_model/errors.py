"""The errors that end a run, each with its exit code (exit_codes.py). Importable without numpy or torch."""

from __future__ import annotations

import errno

from .exit_codes import Exit

_FULL = (errno.ENOSPC, errno.EDQUOT)
# How libraries that drop the errno say it: h5py ("errno = 28, error message = 'No space left on device'").
_FULL_WORDS = ("No space left on device", "Disk quota exceeded")


class RunError(RuntimeError):
    """An expected way for a run to stop; the message names the file, key or archive."""

    code = Exit.ERROR


class ConfigError(RunError, ValueError):
    """A configuration or output location the processor cannot run with; the message names the key."""

    code = Exit.CONFIG


class InputError(RunError):
    """The input cannot be used (missing, unfinished, truncated, changed archive); names the file."""

    code = Exit.INPUT


class ResumeRefused(RunError):
    """A scale-out worker whose settings or archives differ from its run's."""

    code = Exit.REFUSED


class LockedError(RunError):
    code = Exit.LOCKED


class BackboneError(RunError):
    """The model, its weights or the device cannot be used (never replaced by random weights)."""

    code = Exit.MODEL


class DiskFull(ConfigError):
    """The disk under the output or the work folder is full: free space and run again (nothing is lost)."""


def disk_full(exc: BaseException | None) -> BaseException | None:
    """The error in ``exc``'s chain that says a disk is full (ENOSPC, EDQUOT), or None. A full disk surfaces
    wrapped (the chunk writer's RuntimeError, an index process's error, h5py's message without an errno)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return exc
        if any(w in str(exc) for w in _FULL_WORDS):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class Interrupted(RunError):
    """A stop was requested; everything done so far is durable."""

    code = Exit.INTERRUPTED
