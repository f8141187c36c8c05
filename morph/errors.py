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
