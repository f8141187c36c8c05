"""Entry point of the single-file executable (PyInstaller runs this as __main__)."""

import sys

try:
    from morph.cli import main
except RuntimeError as e:  # numpy refuses a CPU below its baseline (x86-64-v2) at import
    if "baseline" not in str(e):
        raise
    print(f"morph: error: this CPU lacks instructions the bundled numpy needs ({str(e).splitlines()[0]})",
          file=sys.stderr)
    sys.exit(1)

main()
