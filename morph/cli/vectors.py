"""`morph vectors ...`: build control vectors (diffmean now; the SAE pipeline later)."""

from __future__ import annotations

import click

from morph.cli import cli


@cli.group("vectors")
def vectors_cmd():
    """Build and inspect control vectors."""
