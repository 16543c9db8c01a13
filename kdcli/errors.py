"""User-facing errors: one line naming the option or file and the fix; the CLI exits non-zero."""

from __future__ import annotations


class KdcliError(Exception):
    """A mistake in the user's input. The CLI prints ``str(err)`` on one line, no traceback."""

    exit_code = 2


class ConfigError(KdcliError):
    """A bad option, preset override or config file."""


class ZooError(KdcliError):
    """Unknown model name, malformed manifest entry, or missing weight file."""


class DataError(KdcliError):
    """Missing data folder, malformed annotation file, undecodable image."""


class MethodError(KdcliError):
    """Unknown method, or taps a method cannot use (incompatible teacher/student)."""


class TrainingError(KdcliError):
    """Training stopped for a reason the user must act on (e.g. a non-finite loss)."""

    exit_code = 3


class UserInterrupt(BaseException):
    """Ctrl-C where no checkpoint is written (before the training loop, or a second Ctrl-C in it).

    A ``BaseException`` that is not ``KeyboardInterrupt``: typer turns the latter into a silent exit
    130 before kdcli's entry point sees it, and ``except Exception`` blocks must let it through."""

    exit_code = 130
