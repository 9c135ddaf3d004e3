"""Errors that map to exit codes, importable without torch."""


class BackboneError(RuntimeError):
    """The model or its weights could not be loaded (never replaced by random weights)."""
