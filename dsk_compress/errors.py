"""Errors that the CLI turns into one clear line and exit code 2."""

from __future__ import annotations


class DskError(Exception):
    """Base class: a problem the user can fix. ``hint`` says how."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class RecipeError(DskError):
    """A recipe that does not load, validate or plan."""


class InvalidArgument(DskError):
    """Library code given a value it cannot use for the model at hand (``ffn_ratio`` that leaves no
    channel, an unknown importance). ``argument`` names the parameter; the message starts with it.
    Library code knows nothing of recipes: the recipe layer (``recipes.stages.common.recipe_fields``)
    maps ``argument`` to the recipe field, e.g. ``stages.2.ffn_ratio``.
    """

    def __init__(self, message: str, argument: str, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.argument = argument

    def as_field(self, path: str) -> RecipeError:
        """This error as a RecipeError about the recipe field ``path``."""
        a = self.argument
        rest = self.message[len(a) :] if self.message.startswith(a) else f": {self.message}"
        return RecipeError(path + rest, hint=self.hint)


class ModelSourceError(DskError):
    """A model source that cannot be resolved or loaded."""


class TaskError(DskError):
    """A task that cannot be built or does not fit the model."""


class ExportError(DskError):
    """Export failed or the exported model does not match torch."""


class MissingBackendError(DskError):
    """An optional backend is not installed; the hint names the pip extra."""

    def __init__(self, backend: str, extra: str) -> None:
        super().__init__(
            f"the {backend} backend is not installed",
            hint=f"pip install 'dsk-compress[{extra}]'",
        )
        self.backend = backend
        self.extra = extra


class DeviceError(DskError):
    """An unknown device profile or an unreachable device."""


class RunError(DskError):
    """A run directory that is missing, corrupt or cannot be resumed."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C (SIGINT) or SIGTERM after its manifest recorded the stage as interrupted.

    A ``KeyboardInterrupt``, so code that cleans up on Ctrl-C does so; the CLI prints ``message`` (which
    names the command that continues the run) and exits with ``exit_code``: 130 for SIGINT, 143 for SIGTERM.
    """

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class TrainingError(DskError):
    """Training diverged (the loss became NaN or infinite); nothing of that step is saved."""
