"""Self-explanation: the model describes a latent's decoder direction in words.

A prompt asks what a placeholder word means; at the placeholder's position the residual
stream is replaced by the latent's decoder direction (stretched to a multiple of that
layer's median norm), and the model continues greedily. The direction comes from the SAE
layer but is written at an early block (~1/10 of the depth), where the model still reads
the position as a word: measured on SmolLM2, a latent that fires on " great", " good",
" wonderful" read as "good or positive" when written at block 3 with 3x the norm, and as
"The in many languages" when written at block 16, the SAE layer itself. Several latents
run at once, one sequence each, through the batch runner's eval-callback edit (the
batched form of `engine.logits_with_edit`). The placeholder positions are found by
tokenising the prompt with two different placeholder words and comparing.

With a 135M model the answers are rough; they are stored next to the evidence (the
tokens a latent fires on), and `morph features search` matches both.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

CHAT_QUESTION = 'What does the word "{w}" mean? Answer in a few words.'
CHAT_ANSWER = 'The word "{w}" means'
BASE_PROMPT = 'The meaning of the word "{w}" is "'
STRENGTH = 3.0  # multiple of the insert layer's median residual norm
DEPTH = 0.1  # insert layer as a fraction of the blocks
MAX_TOKENS = 12


def prompt_tokens(engine, word: str) -> list[int]:
    if engine.info.has_chat_template:
        text = engine.format_chat([{"role": "user", "content": CHAT_QUESTION.format(w=word)}])
        text += CHAT_ANSWER.format(w=word)
        return engine.tokenize(text, add_bos=False, special=True)
    return engine.tokenize(BASE_PROMPT.format(w=word))


def placeholder_positions(engine) -> tuple[list[int], list[int]]:
    """(prompt tokens, positions of the placeholder) for the model's prompt."""
    a = prompt_tokens(engine, "X")
    b = prompt_tokens(engine, "Q")
    if len(a) != len(b):
        raise RuntimeError("placeholder words tokenise differently")
    return a, [i for i, (x, y) in enumerate(zip(a, b)) if x != y]


def insert_layer(engine) -> tuple[int, float]:
    """(block to write at, its median residual norm on a few corpus openings)."""
    from morph.sae.corpus import load_prompts

    layer = max(1, round(DEPTH * engine.n_layer))
    acts = engine.capture([p["text"] for p in load_prompts()[:8]], layer)
    return layer, float(np.median(np.linalg.norm(np.concatenate(acts), axis=1)))


def explain(engine, directions: np.ndarray, layer: int | None = None, residual_norm: float | None = None,
            strength: float = STRENGTH, n_seq: int = 16,
            progress: Callable[[int], None] | None = None) -> list[str]:
    """One short description per row of `directions`, written at `layer` (default: the
    early insert layer) as `strength` x `residual_norm` (that layer's median norm)."""
    if layer is None or residual_norm is None:
        layer, residual_norm = insert_layer(engine)
    toks, where = placeholder_positions(engine)
    n = len(toks)
    out: list[str] = []
    n_seq = max(1, min(n_seq, len(directions)))
    with engine.batch_runner(n_seq=n_seq, n_ctx=n_seq * (n + MAX_TOKENS + 8),
                     n_batch=max(512, n_seq * n)) as runner:
        for g in range(0, len(directions), n_seq):
            group = directions[g : g + n_seq]
            m = len(group)
            vecs = (group / np.linalg.norm(group, axis=1, keepdims=True) * (strength * residual_norm)).astype(np.float32)

            def edit(_layer, acts, vecs=vecs):
                for s in range(m):
                    for p in where:
                        acts[s * n + p] = vecs[s]
                return acts

            runner.clear()
            logits, _ = runner.decode(toks * m, list(range(n)) * m, [s for s in range(m) for _ in range(n)],
                                      ([False] * (n - 1) + [True]) * m, layers=[layer], edit=edit)
            gen: list[list[int]] = [[] for _ in range(m)]
            alive = list(range(m))
            nxt = np.argmax(logits, axis=1)
            for step in range(MAX_TOKENS):
                still = []
                for s, t in zip(alive, nxt.tolist()):
                    if engine.is_eog(t):
                        continue
                    gen[s].append(t)
                    if _done(engine.detokenize(gen[s])):
                        continue
                    still.append(s)
                alive = still
                if not alive or step == MAX_TOKENS - 1:
                    break
                logits, _ = runner.decode([gen[s][-1] for s in alive], [n + len(gen[s]) - 1 for s in alive],
                                          alive, [True] * len(alive))
                nxt = np.argmax(logits, axis=1)
            for s in range(m):
                text = _clean(engine.detokenize(gen[s]))
                out.append(text)
            if progress:
                progress(m)
    return out


def _done(text: str) -> bool:
    t = text.strip()
    return "\n" in t or t.endswith(".")


def _clean(text: str) -> str:
    """The answer's first line, without a trailing period."""
    t = text.strip().split("\n")[0].strip().rstrip(".").strip()
    return t.replace('"', "").strip()
