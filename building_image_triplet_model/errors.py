"""The errors that end a run, each with its exit code (exit_codes.py). Importable without numpy or torch."""

from __future__ import annotations

from .exit_codes import Exit


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


class Interrupted(RunError):
    """A stop was requested; everything done so far is durable."""

    code = Exit.INTERRUPTED
