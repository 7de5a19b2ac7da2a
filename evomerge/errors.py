"""Errors a user can cause and fix. The CLI prints their message in one line and exits 2."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run to many lines), with the
    line after it where the first only introduces it ("Error(s) in loading state_dict for X:")."""
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not text:
        return type(exc).__name__
    return f"{text[0]} {text[1]}" if text[0].endswith(":") and len(text) > 1 else text[0]


class UserError(Exception):
    """Base of every error whose message tells the user what to fix."""


class ConfigError(UserError):
    """The run configuration is invalid: the message names the file and the field."""


class ModelMismatchError(UserError):
    """Experts and base do not share one architecture: the message names the tensors."""


class ModelLoadError(UserError):
    """A model path or hub id could not be loaded."""


class RunDirError(UserError):
    """A run directory is missing, incomplete, or already holds another run."""


class PluginError(UserError):
    """A user fitness plugin failed to import or returned the wrong shape."""


class InsufficientMemoryError(UserError):
    """The workers cannot hold the models the config names: the message gives the figures."""


class RunDirInUseError(RunDirError):
    """Another process writes the run directory (a run or resume holds its lock)."""


class RunChangedError(RunDirError):
    """The run directory's config.yaml no longer describes the search the run started."""


class DiskError(UserError):
    """The disk under a run directory is full or failing; what was recorded is kept, so the run
    resumes once the disk is fixed."""
