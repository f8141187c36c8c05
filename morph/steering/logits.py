"""Logit steering: a feature direction as a bias on the next-token logits.

A control vector adds v to the residual stream after block L. Through the residual
connections v reaches the last block's output x unchanged (its *direct path*), and the
model's logits are

    z = W_U · RMSNorm(x) = W_U · (g ⊙ x / rms(x))      (g: the final norm's gain)

Linearised around a typical x, the direct path of v moves the logits by

    Δz = W_U · (g ⊙ v) / r

where r is a typical RMS of the last block's output, measured once per model (median
over neutral text). That Δz, times the feature's scale, is added to the logits at every
sampled token. Choices, and why:

- **r is a constant**, not the current token's rms(x): a bias computed once per request
  needs no access to the forward pass, so it works with any engine (it is a sampler's
  logit bias) and costs nothing per token. The true rms(x + v) also grows a little with
  v; at the scales morph allows (|scale| <= 2 of a middle layer's norm, and the last
  block's norm is larger) the linearisation stays close.
- **The gain g is applied** (SmolLM2's final norm gain is far from uniform), and no mean
  is subtracted (RMSNorm does not centre).
- **Only the direct path.** What the later blocks do with v (attention and MLPs reading
  the steered residual) is lost; that indirect effect is most of what residual steering
  does, so logit steering is much weaker at the same scale (measured by
  experiments/logit_steering.py; figures in the README's server section).
- SmolLM2 ties its input and output embeddings (no `output.weight` in the GGUF), so W_U
  is `token_embd.weight`, dequantised from the GGUF with the `gguf` package.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from morph.errors import MorphError
from morph.steering.diffmean import NEUTRAL_TEXTS
from morph.steering.vector import ControlVector

# Neutral, register-free sentences (written for morph) for the final-layer norm: the
# fluency measure's, and more of the same kind.
REFERENCE_TEXTS = NEUTRAL_TEXTS + [
    "The meeting was moved to Thursday because two people were away.",
    "A bridge over the river connects the old town with the new district.",
    "He keeps his bicycle in the hall next to the front door.",
    "The recipe needs two eggs, a cup of flour and a little milk.",
    "Our office has twelve desks, a small kitchen and one meeting room.",
    "The museum shows paintings from the last three centuries.",
    "Please send me the list of names before the end of the week.",
    "The shop on the corner sells newspapers, bread and fresh fruit.",
    "During the summer the days are long and the nights are short.",
    "The road to the village was closed for repairs last month.",
]


@dataclass
class OutputHead:
    """The final norm's gain and the unembedding matrix, dequantised to float32."""

    gain: np.ndarray  # (n_embd,)
    unembed: np.ndarray  # (n_vocab, n_embd)
    tied: bool  # True: W_U is the input embedding (no separate output.weight)

    @classmethod
    def load(cls, path: str | Path) -> "OutputHead":
        import gguf
        from gguf.quants import dequantize

        try:
            r = gguf.GGUFReader(str(path))
        except Exception as e:  # gguf raises ValueError/struct errors on bad files
            raise MorphError(f"{path}: not a readable GGUF model ({e})") from None
        tensors = {t.name: t for t in r.tensors}
        norm = tensors.get("output_norm.weight")
        out = tensors.get("output.weight")
        tied = out is None
        if tied:
            out = tensors.get("token_embd.weight")
        if norm is None or out is None:
            raise MorphError(f"{path}: no output_norm.weight / output (or token_embd) weights: "
                             "logit steering needs a llama-style output head")
        gain = np.asarray(dequantize(norm.data, norm.tensor_type), dtype=np.float32).reshape(-1)
        w = np.asarray(dequantize(out.data, out.tensor_type), dtype=np.float32)
        w = w.reshape(-1, gain.shape[0])
        return cls(gain, np.ascontiguousarray(w), tied)

    @property
    def n_vocab(self) -> int:
        return self.unembed.shape[0]


def final_rms(engine, n_layer: int, n_embd: int, texts=REFERENCE_TEXTS) -> float:
    """Median RMS of the last block's output over neutral text (position 0, the attention
    sink, left out). Through the engine's batch runner with logits wanted at every row:
    llama.cpp computes the last block only for the rows whose logits are wanted."""
    norms = []
    last = n_layer - 1
    with engine.batch_runner(n_seq=1, n_ctx=512, n_batch=512) as br:
        for text in texts:
            tokens = engine.tokenize(text)[:512]
            n = len(tokens)
            if n < 2:
                continue
            br.clear()
            _, acts = br.decode(tokens, list(range(n)), [0] * n, [True] * n, layers=[last])
            norms.append(np.linalg.norm(acts[last][1:], axis=1))
    if not norms:
        raise MorphError("could not measure the last block's residual norm")
    return float(np.median(np.concatenate(norms)) / np.sqrt(n_embd))


class LogitSteering:
    """Control vectors -> dense token biases, Δz = W_U (g ⊙ v) / r (see the module doc)."""

    def __init__(self, head: OutputHead, rms: float):
        if not rms > 0:
            raise MorphError("logit steering needs a positive final-layer RMS")
        self.head = head
        self.rms = float(rms)
        self._cache: dict[bytes, np.ndarray] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_engine(cls, engine, info) -> "LogitSteering":
        head = OutputHead.load(info.file.path)
        if head.gain.shape[0] != info.n_embd:
            raise MorphError(f"output norm has {head.gain.shape[0]} values, the model's n_embd is {info.n_embd}")
        return cls(head, final_rms(engine, info.n_layer, info.n_embd))

    def bias(self, cv: ControlVector | None) -> np.ndarray | None:
        """The token bias (n_vocab,) float32 for `cv` (already scaled); None for no vector."""
        if cv is None or cv.is_zero():
            return None
        key = cv.fingerprint()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        v = np.zeros(self.head.gain.shape[0], dtype=np.float64)
        for d in cv.directions.values():  # every block's vector reaches the end the same way
            if d.shape[0] != v.shape[0]:
                raise MorphError(f"control vector width {d.shape[0]} != model width {v.shape[0]}")
            v += d
        b = (self.head.unembed @ (self.head.gain * v / self.rms).astype(np.float32)).astype(np.float32)
        with self._lock:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = b
        return b
