"""One exception type for problems the user can fix; the CLI prints it as one line.

Exit status of `morph` (also in `morph --help`): 0 done; 1 an error, bad input or bad
usage alike; 2 the command needs a terminal; 130 interrupted (Ctrl-C).
"""

EXIT_ERROR = 1
EXIT_NEEDS_TERMINAL = 2
EXIT_INTERRUPTED = 130


class MorphError(Exception):
    """Bad input or environment: shown to the user as `morph: error: <message>`."""

    exit_code = EXIT_ERROR


class NeedsTerminal(MorphError):
    """An interactive command (write, repl) run without a terminal."""

    exit_code = EXIT_NEEDS_TERMINAL


class FieldError(MorphError):
    """Bad input in one named field of a request body (a server answers 400 naming it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def kind_of(v) -> str:
    """A JSON value as an error message names it: "a string", "an array", 0.5, "null"."""
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (int, float)):
        return f"{v!r}"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return "null" if v is None else type(v).__name__
