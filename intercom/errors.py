"""The one exception root of the package, with a subclass per kind of expected fault."""


class IntercomError(Exception):
    """Root of every error the station raises on purpose."""


class ConfigError(IntercomError, ValueError):
    """The configuration file is missing, unreadable or invalid.

    ``problems`` holds one line per fault, each naming the key path and the reason.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class HardwareError(IntercomError, RuntimeError):
    """A pin, camera or sound device could not be opened or driven."""


class StationNotRunningError(IntercomError, ConnectionError):
    """No station answers on the control socket of a state directory."""


class CommandRefusedError(IntercomError, PermissionError):
    """A command was refused (bad form, not allowed, or denied)."""
