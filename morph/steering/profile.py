"""One steering path for every front end: grammar, limit, resolver and stored form.

`morph steer -f`, the REPL's `/feature`, the editor's `:feature` and F2 panel, the
`[features]` table of config.toml and the server's `steering` field all go through here,
so a request means the same thing everywhere and gives the same vector, bit for bit.

Grammar of one request:

    name[@method][=value]   value: a number (a fraction of the steered layer's residual
                            norm; negative steers away), `default` (the feature's measured
                            scale) or `off` (remove it). A bare name means `name=default`.
    off                     alone: every feature off.

Command lines (REPL, editor) also take `name value`, with a space. One limit for every
scale: |scale| <= MAX_SCALE. Control-vector files (`--vector PATH[=SCALE]`) take the same
value grammar, default scale 1.0.

Stored form (history, logs, the editor's per-document profile, server logs): a dict
{"formal@sae": 0.3, "file:/abs/path.gguf": 1.0}: explicit method, explicit float scale.
Stored keys parse back with the same grammar.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

from morph.errors import MorphError

if TYPE_CHECKING:  # loaded where vectors are: the editor paints before numpy is imported
    from morph.steering.vector import ControlVector

MAX_SCALE = 2.0  # 2x the residual norm already wrecks every model we measured
OFF = "off"
DEFAULT = "default"
FILE_PREFIX = "file:"


@dataclass(frozen=True)
class Spec:
    """One parsed request. value: float, None (the default scale) or OFF."""

    name: str
    method: str | None = None
    value: float | str | None = None

    @property
    def off(self) -> bool:
        return self.value == OFF

    @property
    def all_off(self) -> bool:
        """The bare word `off`: clear every feature."""
        return self.name == "" and self.value == OFF

    @property
    def is_file(self) -> bool:
        return self.name.startswith(FILE_PREFIX)

    def __str__(self) -> str:
        if self.all_off:
            return OFF
        head = self.name + (f"@{self.method}" if self.method else "")
        if self.value is None:
            return head
        return f"{head}={self.value:g}" if isinstance(self.value, float) else f"{head}={self.value}"


def parse_value(raw: str, what: str = "scale") -> float | str | None:
    """`0.3` -> 0.3, `default` -> None, `off` -> OFF; anything else is one clear error."""
    word = raw.strip().lower()
    if word == DEFAULT:
        return None
    if word == OFF:
        return OFF
    try:
        value = float(word)
    except ValueError:
        raise MorphError(f"{what} {raw!r} is not a number (or `default`, `off`)") from None
    return check_scale(value, what)


def check_scale(value: float, what: str = "scale") -> float:
    if not math.isfinite(value):
        raise MorphError(f"{what} must be a finite number")
    if abs(value) > MAX_SCALE:
        raise MorphError(f"{what} {value:g} is outside -{MAX_SCALE:g}..{MAX_SCALE:g}")
    return float(value)


def parse(text: str) -> Spec:
    """Parse `name[@method][=value]` or `off`. MorphError (one line) on anything else."""
    raw = text.strip()
    if raw.lower() == OFF:
        return Spec("", None, OFF)
    if raw.startswith(FILE_PREFIX):  # stored form of --vector: file:PATH[=value]
        path, value = _split_value(raw[len(FILE_PREFIX):], raw)
        if not path:
            raise MorphError(f"{text!r}: missing path after {FILE_PREFIX!r}")
        return Spec(FILE_PREFIX + path, None, value)
    head, value = _split_value(raw, raw)
    name, at, method = head.partition("@")
    name, method = name.strip(), method.strip()
    if not name:
        raise MorphError(f"{text!r}: empty feature name")
    if at and not method:
        raise MorphError(f"{text!r}: empty method after '@'")
    if any(c.isspace() or c in "=@" for c in name + method):
        raise MorphError(f"{text!r}: not a feature request (NAME[@METHOD][=SCALE|default|off])")
    return Spec(name, method or None, value)


def parse_words(words: list[str]) -> Spec:
    """A command line's arguments: `NAME`, `NAME=VALUE`, `NAME VALUE` or `off`."""
    if len(words) == 2 and "=" not in words[0]:
        words = [f"{words[0]}={words[1]}"]
    if len(words) != 1:
        raise MorphError("usage: NAME[@METHOD] [SCALE|default|off], or off")
    return parse(words[0])


def parse_vector_arg(text: str) -> Spec:
    """`--vector PATH[=SCALE]`: a control-vector file, default scale 1.0."""
    path, value = _split_value(text, text)
    if not path:
        raise MorphError(f"{text!r}: missing path before '='")
    if value == OFF:
        raise MorphError(f"{text!r}: `off` is not a scale for a vector file")
    return Spec(FILE_PREFIX + os.path.abspath(path), None, 1.0 if value is None else value)


def _split_value(raw: str, whole: str) -> tuple[str, float | str | None]:
    if "=" not in raw:
        return raw, None
    head, _, val = raw.rpartition("=")
    return head, parse_value(val, f"{whole!r}: scale")


@dataclass(frozen=True)
class Steering:
    """A resolved profile: the stored form and the one combined, validated vector."""

    profile: dict[str, float]
    vector: ControlVector | None
    explicit: frozenset[str] = frozenset()  # keys whose scale the user gave (and vector files)

    def label(self) -> str:
        return ",".join(f"{k}={v:g}" for k, v in self.profile.items())


class Profile:
    """The active features of one session (REPL, editor, a steer run, a server request).

    Mutable in order; `steering()` combines the scaled vectors once per change. Vector
    files are loaded and validated against the model once, then cached.
    """

    def __init__(self, catalog, info=None, *, experimental: bool = False):
        self.catalog = catalog
        self.info = info  # ModelInfo (n_embd, n_layer) to validate against; None: no check
        self.experimental = experimental
        self.items: dict[str, float] = {}
        self.explicit: set[str] = set()  # keys with a scale the user gave: honoured exactly
        self._vectors: dict[str, ControlVector] = {}
        self._cached: Steering | None = None

    # --- changes --------------------------------------------------------------------

    def apply(self, spec: Spec | str) -> list[str]:
        """Apply one request; returns the keys it set or removed.

        Validated before it is kept: an unknown feature or a broken vector file leaves
        the profile as it was. `off` needs no catalog lookup (an experimental or vanished
        feature can always be switched off).
        """
        if isinstance(spec, str):
            spec = parse(spec)
        if spec.all_off:
            keys = list(self.items)
            self.clear()
            return keys
        if spec.off:
            return self.remove(spec.name if spec.method is None else f"{spec.name}@{spec.method}")
        if spec.is_file:
            key, scale = spec.name, (1.0 if spec.value is None else spec.value)
            self._vector_for_file(key)
        else:
            f = self.catalog.get(spec.name if spec.method is None else f"{spec.name}@{spec.method}",
                                 experimental=self.experimental)
            key = f.key
            scale = f.default_scale if spec.value is None else spec.value
            self._vector_for_feature(f)
        self.items[key] = float(scale)
        if spec.is_file or spec.value is not None:
            self.explicit.add(key)
        else:
            self.explicit.discard(key)
        self._cached = None
        return [key]

    def set(self, spec: str, scale: float | None = None) -> str:
        """`set("formal", 0.3)` -> "formal@sae"; scale None: the feature's default."""
        s = parse(spec)
        if s.off or s.all_off:
            raise MorphError(f"{spec!r}: use remove() to switch a feature off")
        return self.apply(Spec(s.name, s.method, s.value if scale is None else check_scale(float(scale))))[0]

    def remove(self, name: str) -> list[str]:
        """Remove `name` (every method of it) or an exact key; returns the keys removed."""
        keys = [k for k in self.items if k == name or k.partition("@")[0] == name]
        for k in keys:
            del self.items[k]
            self.explicit.discard(k)
        if keys:
            self._cached = None
        return keys

    def clear(self) -> None:
        self.items.clear()
        self.explicit.clear()
        self._cached = None

    def load(self, stored: Mapping[str, float | None] | Iterable[str], *, strict: bool = True) -> list[str]:
        """Apply requests in order: spec strings, or a stored/configured mapping {spec: scale
        or None}. strict=False skips what no longer resolves and returns one message each."""
        items = stored.items() if isinstance(stored, Mapping) else ((s, None) for s in stored)
        problems = []
        for key, scale in items:
            try:
                s = parse(key)
                value = s.value if scale is None else check_scale(float(scale))
                self.apply(Spec(s.name, s.method, value))
            except (MorphError, TypeError, ValueError) as e:
                if strict:
                    raise
                problems.append(f"{key}: {e}")
        return problems

    # --- results ----------------------------------------------------------------------

    def steering(self) -> Steering:
        if self._cached is None:
            from morph.steering.vector import combine

            parts = [(self._vectors[k], s) for k, s in self.items.items()]
            self._cached = Steering(dict(self.items), combine(parts) if parts else None,
                                    frozenset(self.explicit & set(self.items)))
        return self._cached

    def vector(self) -> ControlVector | None:
        return self.steering().vector

    def label(self) -> str:
        return self.steering().label()

    # --- loading ------------------------------------------------------------------------

    def _vector_for_feature(self, f) -> ControlVector:
        if f.key not in self._vectors:
            cv = f.load_vector()
            self._validate(cv, f"feature {f.key} ({f.path})")
            self._vectors[f.key] = cv
        return self._vectors[f.key]

    def _vector_for_file(self, key: str) -> ControlVector:
        if key not in self._vectors:
            from morph.steering.vector import ControlVector

            path = key[len(FILE_PREFIX):]
            cv = ControlVector.load(path)
            self._validate(cv, path)
            self._vectors[key] = cv
        return self._vectors[key]

    def _validate(self, cv: ControlVector, where: str) -> None:
        if self.info is not None:
            cv.validate(self.info.n_embd, self.info.n_layer, where=where)


def resolve(catalog, info, requests: Iterable[str] | Mapping[str, float | None], *,
            experimental: bool = False) -> Steering:
    """Requests (spec strings, or a mapping {spec: scale or None}) -> Steering."""
    p = Profile(catalog, info, experimental=experimental)
    p.load(requests)
    return p.steering()
