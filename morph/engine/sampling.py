"""Token choice for batched generation (engine/generate.py), in numpy, one row at a time.

`penalize` is llama.cpp's penalties sampler (repeat penalty only) as the engine's sampler
chain applies it, so greedy rows pick the token `engine.stream` picks. `sample_row` draws
from a row with its own generator, so a sequence's text depends only on its own seed;
it is not llama.cpp's `dist` sampler (another random stream), so a sampled batch does
not reproduce `engine.stream`'s sampled text, only itself.
"""

from __future__ import annotations

from collections import Counter

import numpy as np


def penalize(logits: np.ndarray, recent: Counter, penalty: float) -> np.ndarray:
    """llama.cpp's repeat penalty over the tokens in `recent` (a count per token of the last
    `repeat_last_n` sampled): each one's logit divided by `penalty` if positive, multiplied
    if not, in float32. Returns a copy when anything changes."""
    if penalty == 1.0 or not recent:
        return logits
    ids = np.fromiter(recent.keys(), dtype=np.int64)
    row = logits.copy()
    v = row[ids]
    p = np.float32(penalty)
    row[ids] = np.where(v <= 0, v * p, v / p)
    return row


def sample_row(row: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int, top_p: float,
               window: float = 12.0) -> int:
    """One token: greedy at temperature 0, else top-k, then temperature, then top-p.

    Candidates are the tokens within `window` logits of the row's maximum (relative
    probability < e^-15 at temperature 0.8 below it): a full argpartition over a 49k-262k
    vocabulary per row cost more than the decode step itself.
    """
    if temperature <= 0:
        return int(np.argmax(row))
    cand = np.flatnonzero(row >= row.max() - np.float32(window))
    vals = row[cand]
    if 0 < top_k < len(cand):
        part = np.argpartition(-vals, top_k - 1)[:top_k]
        cand, vals = cand[part], vals[part]
    order = np.lexsort((cand, -vals))  # by logit, ties by token id
    cand = cand[order]
    v = vals[order].astype(np.float64) / temperature
    p = np.exp(v - v[0])
    p /= p.sum()
    keep = (np.cumsum(p) - p) < top_p  # the smallest prefix whose mass reaches top_p
    p = np.where(keep, p, 0.0)
    c = np.cumsum(p)
    j = min(int(np.searchsorted(c, rng.random() * c[-1], side="right")), len(c) - 1)
    return int(cand[j])


def logprob_at(rows: np.ndarray, toks) -> np.ndarray:
    """log-softmax of each logits row at its token (`toks[i]` for row i), in the rows' dtype."""
    m = rows.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(rows - m).sum(axis=1))
    return rows[np.arange(len(rows)), toks] - lse
