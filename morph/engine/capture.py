"""Residual-stream capture (and position edits) for one text at a time.

A one-sequence `BatchRunner` (batch.py): a llama context of its own that shares the
generation context's weights but has the eval callback set. The callback costs the GIL
on every graph node, so it must stay off the context that generates; and that context
never has a control vector, so `l_out-L` here is clean.

FACTS: the callback is asked once per node (~1,086 per eval); we observe only `l_out-L`.
Returning False after it stops the graph, which makes capture ~2x faster; logits and
deeper KV are garbage then, so each text is evaluated in one ubatch from an empty cache.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

import numpy as np

from morph.engine.batch import BatchRunner
from morph.errors import MorphError


class Capturer:
    """Capture context bound to a LlamaEngine's model. One call at a time (locked)."""

    def __init__(self, engine, n_ctx: int = 1024):
        self.engine = engine
        self.n_embd = engine.n_embd
        self.n_ctx = n_ctx
        self._lock = threading.Lock()
        # one ubatch per text: an early stop never splits a text
        self._runner = BatchRunner(engine, n_seq=1, n_ctx=n_ctx, n_batch=n_ctx, unified=True)

    def close(self) -> None:
        self._runner.close()

    def _run(self, tokens: list[int], layer: int, stop_after: bool, edit=None):
        if not 0 <= layer < self.engine.n_layer:
            raise MorphError(f"layer {layer} is outside 0..{self.engine.n_layer - 1}")
        tokens = tokens[: self.n_ctx]
        n = len(tokens)
        self._runner.clear()
        wrapped = None if edit is None else (lambda _layer, acts: edit(acts))
        return self._runner.decode(tokens, list(range(n)), [0] * n, [False] * (n - 1) + [True],
                                   layers=[layer], edit=wrapped, stop_after=stop_after)

    def capture(
        self,
        texts: Sequence[str],
        layer: int,
        add_bos: bool = True,
        drop_first: bool = True,
    ) -> list[np.ndarray]:
        """Per text, an array (n_tokens, n_embd) of `l_out-<layer>`.

        Position 0 is dropped by default: whether it is BOS or (SmolLM2 adds none) the first
        word, it is the attention sink with a residual norm ~160x the median.
        """
        out = []
        with self._lock:
            for text in texts:
                tokens = self.engine.tokenize(text, add_bos=add_bos)
                if not tokens:
                    out.append(np.zeros((0, self.n_embd), np.float32))
                    continue
                _, acts = self._run(tokens, layer, stop_after=True)
                out.append(acts[layer][1:] if drop_first else acts[layer])
        return out

    def capture_tokens(self, tokens: list[int], layer: int) -> np.ndarray:
        """Activations for exact token ids (no BOS handling)."""
        with self._lock:
            return self._run(list(tokens), layer, stop_after=True)[1][layer]

    def logits_with_edit(
        self, text: str, layer: int, edit: Callable[[np.ndarray], np.ndarray | None]
    ) -> np.ndarray:
        """Next-token logits after `text`, with `edit(acts)` rewriting `l_out-<layer>`.

        `edit` gets (n_tokens, n_embd) and returns the replacement (or None to keep it).
        This is the position-specific intervention self-explanation needs.
        """
        with self._lock:
            logits, _ = self._run(self.engine.tokenize(text), layer, stop_after=False, edit=edit)
            return np.array(logits[-1])
