"""Teacher-forced log-probabilities of texts under per-sequence steering.

Steering a sequence = adding a vector to `l_out-L` at every one of its positions, which
is what a control vector on block L does (FACTS: the same bit for bit). Done in the batch
runner's eval callback, each sequence of a batch can carry its own vector, so a whole
scale sweep or candidate comparison costs one pass over the texts, not one per vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from morph.engine.base import BatchRunner
from morph.engine.sampling import logprob_at


@dataclass
class Item:
    tokens: list[int]
    start: int  # score tokens[start:] (each predicted from what precedes it); start >= 1
    vector: np.ndarray | None = None  # added at the layer, every position


def logprobs(runner: BatchRunner, items: list[Item], layer: int, full: bool = False,
             edit_extra=None) -> list[np.ndarray]:
    """Per item, log p(tokens[i] | tokens[:i]) for i in start..end.

    full=True: the whole log-softmax row per scored position instead (for KL measures).
    edit_extra(rows_of, acts): an optional further rewrite of the layer's activations.
    """
    out: list[np.ndarray | None] = [None] * len(items)
    nb = runner.n_batch
    i = 0
    while i < len(items):
        group = []
        size = 0
        while i < len(items) and len(group) < runner.n_seq:
            n = len(items[i].tokens)
            if n > nb:
                raise ValueError(f"item of {n} tokens exceeds the batch size {nb}")
            if size + n > nb:
                break
            group.append(i)
            size += n
            i += 1
        toks, pos, seq, want = [], [], [], []
        rows_of = []  # per group member: batch rows carrying its vector
        for s, j in enumerate(group):
            it = items[j]
            n = len(it.tokens)
            rows_of.append((len(toks), len(toks) + n))
            toks += it.tokens
            pos += range(n)
            seq += [s] * n
            want += [p >= it.start - 1 and p < n - 1 for p in range(n)]
        vecs = [items[j].vector for j in group]

        def edit(_layer, acts, rows_of=rows_of, vecs=vecs, group=group):
            if edit_extra is not None:
                acts = edit_extra([items[j] for j in group], rows_of, acts)
            elif all(v is None for v in vecs):
                return None
            for (a, b), v in zip(rows_of, vecs):
                if v is not None:
                    acts[a:b] += v
            return acts

        runner.clear()
        logits, _ = runner.decode(toks, pos, seq, want, layers=[layer], edit=edit)
        lp = _log_softmax(logits) if full else _log_softmax_at(logits, np.asarray(toks), np.asarray(want))
        r = 0
        for j in group:
            it = items[j]
            m = len(it.tokens) - it.start
            out[j] = lp[r : r + m]
            r += m
    return out  # type: ignore[return-value]


def _log_softmax_at(logits: np.ndarray, toks: np.ndarray, want: np.ndarray) -> np.ndarray:
    """log-softmax of each output row at the token that follows it in the batch."""
    rows = np.flatnonzero(want)
    return logprob_at(np.asarray(logits, np.float32), toks[rows + 1])


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    lg = np.asarray(logits, np.float32)
    mx = lg.max(axis=1, keepdims=True)
    z = lg - mx
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kl(p_log: np.ndarray, q_log: np.ndarray) -> np.ndarray:
    """KL(p || q) per row, from log-probabilities."""
    return (np.exp(p_log) * (p_log - q_log)).sum(axis=1)
