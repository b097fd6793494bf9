"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class RespecError(Exception):
    """Base class of every error caused by user input (bad files, bad values)."""


class CheckpointError(RespecError):
    """A checkpoint directory is missing, corrupt, unsupported or holds non-finite weights."""


class ConfigError(RespecError):
    """A configuration value is invalid."""


class DrafterMismatchError(RespecError):
    """A drafter does not fit the target it is paired with."""


class PromptError(RespecError):
    """A prompt is empty, holds invalid token ids or does not fit the context."""


class DuplicateRequestError(RespecError):
    """A request id is already in use by an unfinished request."""


class UnknownRequestError(RespecError):
    """No unfinished request has the given id."""


class SamplingError(RespecError):
    """Sampling parameters are invalid."""


class DataError(RespecError):
    """A data file (tasks, prompts) is missing or malformed."""


class TrainingError(RespecError):
    """Training diverged (a NaN or infinite loss)."""


def check_finite_loss(loss, step: int, what: str) -> None:
    """Raises TrainingError if the scalar tensor `loss` is NaN or infinite (before it reaches the weights)."""
    if not bool(loss.isfinite()):
        raise TrainingError(f"{what}: loss is {float(loss.detach())} at step {step}; nothing was saved. Lower the learning "
                            "rate or check the data and the starting weights for NaN")
