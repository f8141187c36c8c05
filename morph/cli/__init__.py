"""The `morph` command: a click group (app.py); each subcommand lives in its own small module.

Commands stay thin: parse, call into the modules that do the work, print. A MorphError
or a usage error (click's) anywhere becomes one `morph: error: ...` line on stderr and
the exit status in EXIT_STATUS; Ctrl-C exits 130. A command started through `main` (the
`morph` executable, `python -m morph`) keeps a crash report for native crashes (crash.py).
"""

from morph.cli.app import EXIT_STATUS, Ctx, cli, main  # noqa: F401 (the `morph` entry point: morph.cli:main)

# Subcommands (morph/cli/<name>.py) register themselves on `cli` when first looked up
# (app.COMMANDS): each command imports only what it needs.
