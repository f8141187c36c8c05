"""Entry point of the single-file executable (PyInstaller runs this as __main__)."""

from morph.cli import main

main()
