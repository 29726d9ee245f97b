"""The errors a user's input causes: the CLI prints them as one line and exits 2.

A module of its own, below everything else: config.py and the growth operators' registry
(growth_operators.py) both raise them and import each other's neighbours."""


class StackfastError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits 2."""


class ConfigError(StackfastError, ValueError):
    """A configuration value or file is invalid."""


class GrowthError(StackfastError, ValueError):
    """Growth asked for with impossible settings (factor, layer map, width target...)."""


class WriteError(StackfastError):
    """A file or folder could not be written: no space left, a read-only or forbidden place,
    an I/O error. Whatever was there before is left as it was."""


class StopNow(KeyboardInterrupt):
    """A second stop signal: the job ends at once, without a checkpoint (the CLI prints one
    line). `exit_status` is 128 + the signal's number, as a shell reports a killed process."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum
