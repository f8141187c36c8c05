"""The eval prompts: `morph/data/eval/prompts.jsonl`, written for morph.

Each line: {"id", "task": "rewrite"|"continue", "genre", "split": "tune"|"report",
"quick": bool, "text"}. The split is fixed in the file (half each, balanced by genre):
scales and other choices are tuned on `tune`, every reported figure comes from `report`.
`quick` marks a fixed small subset (4 per task per split) for `morph eval --quick`.
They are kept apart from the contrast sets (vectors/recipes/) and the SAE corpus
(morph/data/corpus/); tests/test_eval.py checks that no long n-gram is shared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from morph.errors import MorphError

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "eval"
PROMPTS_FILE = DATA_DIR / "prompts.jsonl"
TASKS = ("rewrite", "continue")
SPLITS = ("tune", "report")


@dataclass(frozen=True)
class EvalPrompt:
    id: str
    task: str
    genre: str
    split: str
    text: str
    quick: bool = False


def load_prompts(split: str | None = None, quick: bool = False, tasks=TASKS,
                 limit: int | None = None, path: Path = PROMPTS_FILE) -> list[EvalPrompt]:
    """Prompts of one split (None: both), in file order (genres rotate, so a prefix per
    task covers genres evenly). limit: at most this many per task."""
    if split is not None and split not in SPLITS:
        raise MorphError(f"unknown split {split!r} (use {' or '.join(SPLITS)})")
    out: list[EvalPrompt] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise MorphError(f"{path}: cannot read eval prompts ({e})") from None
    for line in lines:
        if line.strip():
            out.append(EvalPrompt(**json.loads(line)))
    out = [p for p in out if (split is None or p.split == split) and p.task in tasks and (p.quick or not quick)]
    if limit is not None:
        kept, seen = [], {t: 0 for t in TASKS}
        for p in out:
            if seen[p.task] < limit:
                kept.append(p)
                seen[p.task] += 1
        out = kept
    return out
