"""One exception type for problems the user can fix; the CLI prints it as one line."""


class MorphError(Exception):
    """Bad input or environment: shown to the user as `morph: error: <message>`."""
