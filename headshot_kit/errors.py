"""The workbench's own errors: what a user can fix, each with a message that says how."""


class ConfigError(ValueError):
    """A setting is wrong or conflicts with another; the message says what to change."""


class DataError(ValueError):
    """A stage's input folder cannot be used as it is; the message says what to do."""


class RunFailed(RuntimeError):
    """A run stopped for a reason the message explains (a diverged loss, say): the command line
    reports it in one line, as it does a wrong setting."""
