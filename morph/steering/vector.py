"""ControlVector: llama.cpp's control-vector GGUF, as a value with arithmetic.

File format (what `llama-cli --control-vector` reads): `general.architecture =
"controlvector"`, `controlvector.model_hint` (str), `controlvector.layer_count` (int32),
one F32 1-D tensor `direction.N` of length n_embd per steered block N (N >= 1; llama.cpp
rejects 0). llama.cpp ignores other keys, so morph keeps provenance under `morph.*`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from morph import fsutil
from morph.errors import MorphError

_DIR_RE = re.compile(r"^direction\.(\d+)$")
ARCH = "controlvector"


@dataclass
class ControlVector:
    """Per-block directions {block: float32[n_embd]} plus provenance metadata."""

    directions: dict[int, np.ndarray]
    model_hint: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_embd(self) -> int:
        return next(iter(self.directions.values())).shape[0] if self.directions else 0

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    def __mul__(self, scale: float) -> "ControlVector":
        return ControlVector(
            {k: (v * np.float32(scale)).astype(np.float32) for k, v in self.directions.items()},
            self.model_hint,
            dict(self.meta),
        )

    __rmul__ = __mul__

    def __neg__(self) -> "ControlVector":
        return self * -1.0

    def __add__(self, other: "ControlVector") -> "ControlVector":
        if self.directions and other.directions and self.n_embd != other.n_embd:
            raise MorphError(
                f"cannot add control vectors of width {self.n_embd} and {other.n_embd}"
            )
        out = {k: v.copy() for k, v in self.directions.items()}
        for k, v in other.directions.items():
            out[k] = out[k] + v if k in out else v.copy()
        return ControlVector(out, self.model_hint or other.model_hint, {})

    def __sub__(self, other: "ControlVector") -> "ControlVector":
        return self + (-other)

    def is_zero(self) -> bool:
        return all(not np.any(v) for v in self.directions.values())

    def to_buffer(self, n_embd: int, n_layer: int) -> np.ndarray:
        """The flat buffer llama_set_adapter_cvec wants: row k steers block k+1."""
        buf = np.zeros((n_layer - 1, n_embd), dtype=np.float32)
        for il, v in self.directions.items():
            buf[il - 1] = v
        return buf.reshape(-1)

    def validate(self, n_embd: int, n_layer: int, where: str = "control vector") -> None:
        if not self.directions:
            raise MorphError(f"{where}: has no direction.N tensors")
        for il, v in self.directions.items():
            if il < 1 or il >= n_layer:
                raise MorphError(
                    f"{where}: direction.{il} is outside the model's blocks 1..{n_layer - 1}"
                )
            if v.ndim != 1 or v.dtype != np.float32:
                raise MorphError(f"{where}: direction.{il} must be a 1-D F32 tensor")
            if v.shape[0] != n_embd:
                raise MorphError(
                    f"{where}: direction.{il} has {v.shape[0]} values, the model's n_embd is {n_embd}"
                )
            if not np.all(np.isfinite(v)):
                raise MorphError(f"{where}: direction.{il} holds NaN or infinite values")

    def fingerprint(self) -> bytes:
        """Identity of the numbers alone (engines compare it to skip redundant updates)."""
        h = []
        for k in self.layers:
            h.append(k.to_bytes(4, "little") + self.directions[k].tobytes())
        return b"".join(h)

    # --- GGUF I/O -------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        import gguf

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with fsutil.replacing(path) as tmp:
            w = gguf.GGUFWriter(str(tmp), arch=ARCH)
            w.add_string("controlvector.model_hint", self.model_hint)
            w.add_int32("controlvector.layer_count", len(self.directions))
            for key, val in sorted(self.meta.items()):
                _add_meta(w, f"morph.{key}", val)
            for il in self.layers:
                w.add_tensor(f"direction.{il}", np.ascontiguousarray(self.directions[il], np.float32))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ControlVector":
        import gguf

        path = Path(path)
        if not path.is_file():
            raise MorphError(f"{path}: no such control-vector file")
        try:
            r = gguf.GGUFReader(str(path))
        except Exception as e:  # gguf raises ValueError/struct errors on bad files
            raise MorphError(f"{path}: not a readable GGUF file ({_short(e)})") from None
        fields = r.fields
        try:  # metadata of the wrong type or encoding is as broken as a bad header
            arch = _field_value(fields.get("general.architecture"))
            hint = _field_value(fields.get("controlvector.model_hint")) or ""
            meta: dict[str, Any] = {}
            for name, f in fields.items():
                if name.startswith("morph."):
                    meta[name[len("morph."):]] = _decode_meta(_field_value(f))
        except (ValueError, TypeError, IndexError) as e:  # UnicodeDecodeError, JSONDecodeError
            raise MorphError(f"{path}: unreadable metadata ({_short(e)})") from None
        if arch is not None and arch != ARCH:
            raise MorphError(f"{path}: general.architecture is {arch!r}, expected 'controlvector'")
        if not isinstance(hint, str):
            raise MorphError(f"{path}: controlvector.model_hint is not a string")
        dirs: dict[int, np.ndarray] = {}
        for t in r.tensors:
            m = _DIR_RE.match(t.name)
            if not m:
                continue  # llama.cpp ignores other tensors too
            il = int(m.group(1))
            if t.tensor_type != gguf.GGMLQuantizationType.F32:
                raise MorphError(f"{path}: {t.name} is {t.tensor_type.name}, expected F32")
            if len([d for d in t.shape if d != 1]) > 1:
                raise MorphError(f"{path}: {t.name} is not 1-D (shape {list(t.shape)})")
            if il in dirs:
                raise MorphError(f"{path}: {t.name} appears twice")
            dirs[il] = np.array(t.data, dtype=np.float32).reshape(-1)
        if not dirs:
            raise MorphError(f"{path}: no direction.N tensors (not a control vector)")
        if 0 in dirs:
            raise MorphError(f"{path}: direction.0 is invalid (block 0 cannot be steered)")
        cv = cls(dirs, hint, meta)
        widths = {v.shape[0] for v in dirs.values()}
        if len(widths) != 1:
            raise MorphError(f"{path}: directions have different lengths {sorted(widths)}")
        for il, v in dirs.items():
            if not np.all(np.isfinite(v)):
                raise MorphError(f"{path}: direction.{il} holds NaN or infinite values")
        return cv


def combine(parts: list[tuple["ControlVector", float]]) -> ControlVector | None:
    """Scaled sum of several vectors (llama.cpp does the same with --control-vector-scaled)."""
    total: ControlVector | None = None
    for cv, scale in parts:
        term = cv * scale
        total = term if total is None else total + term
    return total


def residual_relative(direction: np.ndarray, residual_norm: float) -> np.ndarray:
    """A unit direction stretched to the layer's typical residual norm.

    Stored that way, a scale of 0.3 means "30% of the residual stream's norm", which keeps
    scales comparable across layers and models (FACTS: absolute units break Gemma 3).
    """
    n = float(np.linalg.norm(direction))
    if not math.isfinite(n) or n == 0.0:
        raise MorphError("cannot normalise a zero or non-finite direction")
    return (direction / n * residual_norm).astype(np.float32)


def _add_meta(w, key: str, val: Any) -> None:
    if isinstance(val, bool):
        w.add_bool(key, val)
    elif isinstance(val, int):
        w.add_int64(key, val)
    elif isinstance(val, float):
        w.add_float64(key, val)
    elif isinstance(val, str):
        w.add_string(key, val)
    else:  # lists, dicts: JSON keeps them exact and readable by any GGUF tool
        w.add_string(key, "json:" + json.dumps(val, sort_keys=True))


def _decode_meta(val: Any) -> Any:
    if isinstance(val, str) and val.startswith("json:"):
        return json.loads(val[5:])
    return val


def _field_value(f) -> Any:
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:
        import gguf

        if f.types and f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode("utf-8")
        return f.parts[f.data[0]].tolist()[0]


def _short(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__
