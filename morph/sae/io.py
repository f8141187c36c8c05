"""SAE files: GGUF with a custom architecture string, like the control vectors beside it.

Tensors (numpy shapes): `W_enc` (n_embd, width), `b_enc` (width), `W_dec` (width,
n_embd; unit rows), `b_dec` (n_embd), all F32. Metadata under `morph-sae.*`: layer, k,
width, n_embd, input scale (x' = x * scale before encoding; decode divides it back),
model id and fingerprint, training tokens, seed and the held-out scores; the rest of the
training record as JSON in `morph-sae.meta`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from morph import fsutil
from morph.errors import MorphError
from morph.sae.train import SAE

ARCH = "morph-sae"
_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_sae(sae: SAE, path: str | os.PathLike) -> str:
    """Write atomically; returns the file's sha256. `sae.meta` must hold layer and model."""
    import gguf

    m = sae.meta
    for key in ("layer", "model_id", "model_fingerprint"):
        if key not in m:
            raise MorphError(f"SAE metadata lacks {key!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with fsutil.replacing(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch=ARCH)
        w.add_uint32(f"{ARCH}.layer", int(m["layer"]))
        w.add_uint32(f"{ARCH}.k", int(sae.k))
        w.add_uint32(f"{ARCH}.width", int(sae.width))
        w.add_uint32(f"{ARCH}.n_embd", int(sae.n_embd))
        w.add_float64(f"{ARCH}.scale", float(sae.scale))
        w.add_string(f"{ARCH}.model_id", str(m["model_id"]))
        w.add_string(f"{ARCH}.model_fingerprint", str(m["model_fingerprint"]))
        for key in ("train_tokens", "seed"):
            if key in m:
                w.add_uint64(f"{ARCH}.{key}", int(m[key]))
        for key in ("fvu", "l0", "dead_share", "residual_norm"):
            if key in m:
                w.add_float64(f"{ARCH}.{key}", float(m[key]))
        w.add_string(f"{ARCH}.meta", json.dumps(m, sort_keys=True))
        for name in _TENSORS:
            w.add_tensor(name, np.ascontiguousarray(getattr(sae, name), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return sha256_file(path)


def load_sae(path: str | os.PathLike) -> SAE:
    import gguf

    path = Path(path)
    if not path.is_file():
        raise MorphError(f"{path}: no such SAE file")
    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:
        raise MorphError(f"{path}: not a readable GGUF file ({e})") from None

    def val(key):
        f = r.fields.get(key)
        try:
            return None if f is None else f.contents()
        except (ValueError, IndexError, TypeError) as e:  # e.g. a string that is not UTF-8
            raise MorphError(f"{path}: unreadable {key} ({str(e).splitlines()[0]})") from None

    if val("general.architecture") != ARCH:
        raise MorphError(f"{path}: not a morph SAE (architecture {val('general.architecture')!r})")
    t = {x.name: x for x in r.tensors}
    missing = [n for n in _TENSORS if n not in t]
    if missing:
        raise MorphError(f"{path}: missing tensors {missing}")
    try:
        d, width = int(val(f"{ARCH}.n_embd")), int(val(f"{ARCH}.width"))
        k, scale, layer = int(val(f"{ARCH}.k")), float(val(f"{ARCH}.scale")), int(val(f"{ARCH}.layer"))
        meta = json.loads(val(f"{ARCH}.meta") or "{}")
    except (TypeError, ValueError) as e:  # a key missing or of the wrong type, bad JSON
        raise MorphError(f"{path}: unreadable SAE metadata ({str(e).splitlines()[0]})") from None
    if not isinstance(meta, dict):
        raise MorphError(f"{path}: SAE metadata is not a JSON object")
    arrays = {}
    for name, shape in (("W_enc", (d, width)), ("b_enc", (width,)), ("W_dec", (width, d)), ("b_dec", (d,))):
        a = np.array(t[name].data, dtype=np.float32)
        if a.size != int(np.prod(shape)):
            raise MorphError(f"{path}: {name} has {a.size} values, expected {shape}")
        arrays[name] = a.reshape(shape)
    meta["layer"] = layer
    return SAE(arrays["W_enc"], arrays["b_enc"], arrays["W_dec"], arrays["b_dec"], k, scale, meta)
