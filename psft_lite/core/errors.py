"""Known failure kinds. The CLI turns each into one paragraph on stderr and an exit code (docs/ARCHITECTURE.md).

Anything else that escapes is a bug and stays loud (a traceback).
"""

from __future__ import annotations


class PsftError(Exception):
    """A failure we can explain to the user in one paragraph."""

    exit_code = 1


class RecipeError(PsftError):
    """The recipe (file or --set overrides) is malformed or inconsistent."""

    exit_code = 2


class DataError(PsftError):
    """A data source cannot be read or yields no usable training examples."""

    exit_code = 2


class ModelError(PsftError):
    """The model or tokenizer named by the recipe cannot be loaded as asked."""

    exit_code = 2


class RunError(PsftError):
    """Training (or another long command) started and then failed."""

    exit_code = 1


class Interrupted(RunError):
    """Stopped by SIGINT/SIGTERM after saving a checkpoint; exit 130 / 143 as shells expect."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class ForgettingGate(PsftError):
    """`--max-forgetting` (or `eval.max_forgetting`): the model lost more general ability than allowed, with
    confidence. Not bad input (2) and not a failed run (1): its own code, so a script can tell "do not ship"."""

    exit_code = 3
