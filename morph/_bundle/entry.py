"""Entry point of the single-file executable (PyInstaller runs this as __main__)."""

import sys

from morph import _bundle
from morph.errors import MorphError

try:
    _bundle.activate(sys.argv[1:])  # before anything imports numpy or llama_cpp
except MorphError as e:
    print(f"morph: error: {e}", file=sys.stderr)
    sys.exit(1)

from morph.cli import main  # noqa: E402

main()
