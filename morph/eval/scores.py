"""Per-output scores and the AxBench-style harmonic mean.

concept     P(pole | output) from the judge, in [0, 1]; concept shift = steered - unsteered
            for the same prompt.
relevance   cosine of the output's MiniLM embedding to the input's (rewrite) or to the
            prompt's (continue). Mapped to [0, 1] as max(0, cosine).
nll         mean negative log-likelihood per token of the output under the UNSTEERED model,
            in the plain (un-instructed) framing of the same task, so every condition is
            scored in one context. Lower is more fluent.
repetition  share of the output's word 3-grams that repeat an earlier 3-gram, in [0, 1].
fluency     exp(-max(0, nll - nll_unsteered)) * (1 - repetition), in [0, 1]: the
            per-token likelihood ratio to the unsteered output of the same prompt (capped
            at 1), discounted by repetition.
hmean       harmonic mean of concept, relevance and fluency (each clipped to [1e-6, 1]),
            per output; conditions report its mean. AxBench combines its three ratings
            the same way, so a condition must do well on all three at once.
"""

from __future__ import annotations

import math
import re

import numpy as np

_WORD = re.compile(r"\w+(?:'\w+)?")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def repetition(text: str, n: int = 3) -> float:
    w = words(text)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def relevance(out_emb: np.ndarray, ref_emb: np.ndarray) -> np.ndarray:
    """Row-wise cosine of unit embeddings, mapped to [0, 1]."""
    return np.clip((out_emb * ref_emb).sum(axis=1), 0.0, 1.0)


def fluency(nll: float, nll_ref: float, rep: float) -> float:
    if not math.isfinite(nll) or not math.isfinite(nll_ref):
        return 0.0
    return math.exp(-max(0.0, nll - nll_ref)) * (1.0 - rep)


def hmean(*xs: float) -> float:
    xs = [min(1.0, max(1e-6, float(x))) for x in xs]
    return len(xs) / sum(1.0 / x for x in xs)
