"""Exception types for bad user input.

Every error a user can fix (config, dataset rows, paths, unsupported models) is a ``UserError`` whose
message names the problem and the fix. The command-line entry points print the message without a
traceback and exit with code 2; library callers can catch the subclasses.
"""


class UserError(Exception):
    """Bad input that the user can fix; the message says what and how."""


class ConfigError(UserError):
    """The YAML config or a command-line override is invalid."""


class DataError(UserError):
    """A dataset cannot be found, loaded, or has too many bad rows."""


class ModelError(UserError):
    """A checkpoint is missing, unreadable, or uses a feature jaxpref does not implement."""
