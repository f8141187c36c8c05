"""Batched greedy generation with a steering vector per sequence (for probing directions).

Comparing many candidate directions by what they make the model *write* needs hundreds
of short generations; one at a time on 2 cores that is ~1 s each. Here up to `n_seq`
sequences decode together in one multi-sequence context (`engine.batch_runner`), each
with its own vector added to `l_out-L` (the same as a control vector on block L; FACTS),
with `Request.apply`'s placement: `prompt_factor` times the vector on the prompt's
positions, the full vector on generated ones (the engine's "generated" = factor 0: the
prompt is evaluated unsteered and the first token sampled from unsteered logits).

Greedy with llama.cpp's repeat penalty over the last `last_n` generated tokens, as the
engine's sampler applies it. Text can differ from `engine.stream` after some tokens
(batched kernels round differently): a probe, not the product path; `morph eval`
measures the product path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from morph.engine.base import BatchRunner


@dataclass
class GenJob:
    tokens: list[int]  # the prompt
    vector: np.ndarray | None = None  # added at the layer (already scaled), or None
    prompt_factor: float = 1.0  # share of the vector on prompt positions (apply_factors)


def penalize(logits: np.ndarray, recent: list[int], penalty: float) -> np.ndarray:
    """llama.cpp's repeat penalty: each distinct recent token's logit divided by `penalty`
    if positive, multiplied if negative."""
    if penalty == 1.0 or not recent:
        return logits
    ids = np.fromiter(set(recent), dtype=np.int64)
    v = logits[ids]
    logits[ids] = np.where(v > 0, v / penalty, v * penalty)
    return logits


def greedy(runner: BatchRunner, jobs: list[GenJob], layer: int, is_eog, max_new: int = 80,
           repeat_penalty: float = 1.1, last_n: int = 64, progress=None) -> list[list[int]]:
    """Generated token ids per job (end-of-generation token excluded).

    The runner must be made with `unified=False`, `n_seq` streams of at least
    len(prompt) + max_new cells each, and n_batch >= the longest prompt: each prompt is
    evaluated in a call of its own, then every sequence of the group advances one token
    per call with consecutive ids (the shapes llama.cpp keeps in order; batch.py).
    """
    out: list[list[int]] = [[] for _ in jobs]
    n_embd = runner.n_embd
    for g0 in range(0, len(jobs), runner.n_seq):
        group = list(range(g0, min(len(jobs), g0 + runner.n_seq)))
        runner.clear()
        gen_vecs = np.zeros((len(group), n_embd), np.float32)
        nxt, pos, done = [], [], [False] * len(group)
        for s, j in enumerate(group):
            job = jobs[j]
            n = len(job.tokens)
            edit = None
            if job.vector is not None:
                gen_vecs[s] = job.vector
                if job.prompt_factor:
                    pv = (job.vector * np.float32(job.prompt_factor)).astype(np.float32)

                    def edit(_layer, acts, pv=pv):
                        acts += pv
                        return acts
            logits, _ = runner.decode(job.tokens, list(range(n)), [s] * n, [False] * (n - 1) + [True],
                                      layers=[layer] if edit else [], edit=edit)
            tok = int(np.argmax(logits[0]))
            if is_eog(tok):
                done[s] = True
            else:
                out[j].append(tok)
            nxt.append(tok)
            pos.append(n)
        steered = bool(gen_vecs.any())

        def step_edit(_layer, acts):
            acts += gen_vecs
            return acts

        for _ in range(max_new - 1):
            if all(done):
                break
            logits, _ = runner.decode(nxt, pos, list(range(len(group))), [True] * len(group),
                                      layers=[layer] if steered else [], edit=step_edit if steered else None)
            for s, j in enumerate(group):
                pos[s] += 1
                if done[s]:
                    continue  # keeps decoding its last token (consecutive ids), ignored
                row = penalize(np.array(logits[s], np.float32), out[j][-last_n:], repeat_penalty)
                tok = int(np.argmax(row))
                if is_eog(tok):
                    done[s] = True
                    continue
                out[j].append(tok)
                nxt[s] = tok
        if progress:
            progress(len(group))
    return out
