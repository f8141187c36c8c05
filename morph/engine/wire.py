"""How a request's steering travels to vLLM's workers: `SamplingParams.extra_args["morph"]`.

Written where a request is made (VllmEngine, or `vllm serve` with morph's plugin:
server/vllm_serve.py) and read in the worker (vllm_plugin.WorkerState) and by the engine
core's prefix-cache patch. One dict, every field optional:

    key            hash of the vector: the worker's table row, part of the cache salt
    vector         bytes, float32 (n_layer, hidden), row N = block N
    apply          the placement as given; prompt_factor: its share on prompt tokens
    captures       [{"tag", "layer": int | "final", "edit": id}]: rows to copy out or edit
    split          where "generated" starts when scoring a given continuation
    salt           a private cache salt (edited KV is never reused)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from morph.steering.request import apply_factors
from morph.steering.vector import ControlVector

EXTRA_KEY = "morph"


def dense(directions: dict[int, np.ndarray], n_layer: int, hidden: int) -> np.ndarray:
    """{block: vector} -> (n_layer, hidden) float32, row N for block N (row 0 stays zero)."""
    out = np.zeros((n_layer, hidden), np.float32)
    for il, v in directions.items():
        out[il] = v
    return out


def vector_key(arr: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(arr, np.float32).tobytes(), digest_size=12).hexdigest()


def encode(cv: ControlVector | None, apply: str, n_layer: int, hidden: int) -> dict:
    """The entry for a vector (already scaled) and its placement; {} for no steering."""
    pf = apply_factors(apply)[0]
    if cv is None or cv.is_zero():
        return {}
    arr = dense(cv.directions, n_layer, hidden)
    return {"key": vector_key(arr), "vector": arr.tobytes(), "apply": apply, "prompt_factor": pf}


@dataclass
class Steer:
    """The entry as the worker reads it."""

    key: str | None = None
    vector: bytes | None = None
    prompt_factor: float = 1.0
    captures: list[dict] = field(default_factory=list)
    split: int | None = None
    salt: str = ""
    apply: str = "all"

    @classmethod
    def of(cls, sampling_params) -> "Steer | None":
        m = (getattr(sampling_params, "extra_args", None) or {}).get(EXTRA_KEY) if sampling_params is not None else None
        if not m:
            return None
        caps = list(m.get("captures") or ())
        if m.get("capture"):
            caps.append(m["capture"])
        split = m.get("split")
        return cls(m.get("key"), m.get("vector"), float(m.get("prompt_factor", 1.0)), caps,
                   None if split is None else int(split), str(m.get("salt", "")), str(m.get("apply", "all")))

    def cache_salt(self) -> str | None:
        """Prefix-cache salt: the vector and its placement; `salt` keeps edited KV private."""
        if not (self.key or self.salt):
            return None
        return f"morph:{self.key}:{self.prompt_factor!r}:{self.salt}"
