"""The base of every error the build reports as one line and exit code 2 (config, backbone, data, export)."""


class BuildError(Exception):
    """A problem the user can fix: the message says what and where."""
