"""The errors a user's input causes: the CLI prints them as one line and exits 2.

A module of its own, below everything else: config.py and the growth operators' registry
(growth_operators.py) both raise them and import each other's neighbours. It also owns which
errno values are the file system refusing a write (`PLACE_ERRNOS`): `report_errors` turns
them into one line, and files.py, which imports this module, words them; keeping them here
means files.py depends on errors.py and never the other way round."""
import errno
import sys

SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# The file system's refusals of a write: a full disk, a read-only or forbidden place, an I/O error.
PLACE_ERRNOS = SPACE_ERRNOS + (errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


class StackfastError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits 2."""


class ConfigError(StackfastError, ValueError):
    """A configuration value or file is invalid."""


class GrowthError(StackfastError, ValueError):
    """Growth asked for with impossible settings (factor, layer map, width target...)."""


class DataError(StackfastError):
    """Unusable data: missing, empty, truncated or inconsistent files."""


class WriteError(StackfastError):
    """A file or folder could not be written: no space left, a read-only or forbidden place,
    an I/O error. Whatever was there before is left as it was."""


class StopNow(KeyboardInterrupt):
    """A second stop signal: the job ends at once, without a checkpoint (the CLI prints one
    line). `exit_status` is 128 + the signal's number, as a shell reports a killed process."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum


def report_errors(command, args) -> int:
    """Run a command (`stackfast COMMAND`, `python stackfast/train.py`) and return its exit
    status, a user error or a refused write printed as one line: status 2."""
    try:
        return command(args)
    except StackfastError as e:
        print(f"stackfast: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # The file system's refusals in a command's own writes (plan, eval, plot --out; the
        # writers with a handler of their own say more): one line, not a traceback.
        if e.errno not in PLACE_ERRNOS:
            raise
        print(f"stackfast: error: {e.filename or 'a write'}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stackfast: interrupted", file=sys.stderr)
        return 130
