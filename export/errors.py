"""The export's one user-error type (every export module raises it; the CLI maps it to exit code 2)."""


class ExportError(Exception):
    """A problem with the user's request (bad path, existing artifact, unusable option): exit code 2 at the CLI."""
