"""The errors a user's input causes: the CLI prints them as one line and exits 2.

A module of its own, below everything else: config.py and the growth operators' registry
(growth_operators.py) both raise them and import each other's neighbours."""


class StackfastError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits 2."""


class ConfigError(StackfastError, ValueError):
    """A configuration value or file is invalid."""


class GrowthError(StackfastError, ValueError):
    """Growth asked for with impossible settings (factor, layer map, width target...)."""
