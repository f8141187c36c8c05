"""The `morph` command: a click group (app.py); each subcommand lives in its own small module.

Commands stay thin: parse, call into the modules that do the work, print. A MorphError
or a usage error (click's) anywhere becomes one `morph: error: ...` line on stderr and
the exit status in EXIT_STATUS; Ctrl-C exits 130. A command started through `main` (the
`morph` executable, `python -m morph`) keeps a crash report for native crashes (crash.py).
"""

from morph.cli.app import EXIT_STATUS, Ctx, cli, main  # noqa: F401 (the `morph` entry point: morph.cli:main)

# Subcommands register themselves on `cli` when imported.
from morph.cli import models as _models  # noqa: F401
from morph.cli import steer as _steer  # noqa: F401
from morph.cli import log as _log  # noqa: F401
from morph.cli import features as _features  # noqa: F401
from morph.cli import vectors as _vectors  # noqa: F401
from morph.cli import repl as _repl  # noqa: F401
from morph.cli import write as _write  # noqa: F401
from morph.cli import history as _history  # noqa: F401
from morph.cli import eval as _eval  # noqa: F401
from morph.cli import serve as _serve  # noqa: F401
from morph.cli import doctor as _doctor  # noqa: F401
