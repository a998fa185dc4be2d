"""The errors that mean bad input, not a bug: one base class, :class:`UserError`.

``hp_deepspeed.cli.main`` catches ``UserError`` once and prints its message as one line naming
the file, key or value and what was expected, instead of a traceback from every rank. Raise one
of the subclasses below for anything a user can fix by changing a file, a config value or the
environment; raise anything else for a bug. Each keeps the built-in base it had (``ValueError``
or ``RuntimeError``), so ``except ValueError`` in callers still sees it.

This module owns the classes only; the messages are written where the error is found.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names what is wrong and what was expected, in one line."""


class ConfigError(UserError, ValueError):
    """A config value or key is wrong; the message names the dotted key and what was expected."""


class DataError(UserError, ValueError):
    """Bad data or data configuration; the message names the task, file and line concerned."""


class CheckpointError(UserError, RuntimeError):
    """A run checkpoint (``step-N/``) cannot be used; the message names the folder and what is wrong."""


class WeightsError(UserError, ValueError):
    """A Hugging Face weights folder does not match the model; the message names the file and the tensor."""


class LaunchEnvironmentError(UserError, RuntimeError):
    """The environment does not describe a distributed job consistently."""


class ReportError(UserError, RuntimeError):
    """The run directory cannot be reported on; the message says why."""
