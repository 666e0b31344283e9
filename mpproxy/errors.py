"""Typed errors and the process exit codes mpproxy uses.

Library code raises these; only `cli.py` turns them into an exit status.
"""

EXIT_OK = 0
EXIT_FAILURE = 1          # bad config, cannot bind, another instance running
EXIT_WORKER_BOOT = 3      # a worker could not start; the master backs off instead of looping


class MpproxyError(Exception):
    """Base for errors that end in one clear line to the user, never a traceback."""


class ConfigError(MpproxyError):
    """One or more problems in a configuration file.

    `problems` holds one line each, already formatted as
    `file:line: key.path: message` (the line part is left out when unknown).
    """

    def __init__(self, problems):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__('\n'.join(self.problems))


class StartupError(MpproxyError):
    """The master could not start: a port in use, a locked pid file, ..."""


class WorkerBootError(MpproxyError):
    """A worker failed before it could serve (exits with EXIT_WORKER_BOOT)."""
