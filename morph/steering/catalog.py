"""The feature catalog: named features for one model, from `features.json` manifests.

Manifests live in `vectors/<model-id>/features.json` (shipped with morph) and in the
user's data dir (`morph vectors build` output); a user entry overrides a shipped one with
the same name and method. A bare name resolves to the method with the better measured
score (`morph eval`'s harmonic mean, `scores.eval.hmean`), else SAE before diffmean;
`formal@diffmean` names the method explicitly. Features whose measured scores fall short
of the goal are marked `experimental` and are refused unless asked for explicitly.

Scales are fractions of the layer's residual norm: vector files store the direction
stretched to that norm (see vector.residual_relative), so `formal=0.3` adds 30% of it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from morph import fsutil, paths
from morph.errors import MorphError
from morph.steering.profile import MAX_SCALE
from morph.steering.vector import ControlVector

MANIFEST = "features.json"
METHOD_PREFERENCE = ("sae", "diffmean")  # which method a bare name picks first


@dataclass
class Feature:
    name: str
    description: str
    method: str  # "sae" | "diffmean" | other producers
    file: str  # relative to the manifest's directory
    layer: int
    default_scale: float
    residual_norm: float | None = None
    latents: list[int] = field(default_factory=list)
    latent_weights: list[float] = field(default_factory=list)
    explanation: str = ""
    scores: dict[str, Any] = field(default_factory=dict)
    experimental: bool = False  # falls short of the quality goal (morph eval): opt-in only
    source: str = ""  # "shipped" | "user" (not stored)
    path: Path | None = None  # resolved vector file (not stored)

    @property
    def key(self) -> str:
        return f"{self.name}@{self.method}"

    @property
    def eval_label(self) -> str:
        """What `morph eval` measured, for lists and the editor's panel."""
        ev = self.scores.get("eval")
        num = (int, float)  # a hand-edited manifest may hold anything: no number, no label
        if not isinstance(ev, dict) or not isinstance(ev.get("concept_shift"), num):
            return "not evaluated"
        rel, plain = ev.get("relevance_ratio"), ev.get("relevance", 0)
        rel = f"relevance {rel:.0%}" if isinstance(rel, num) else f"relevance {plain:.2f}" if isinstance(plain, num) else ""
        return f"shift {ev['concept_shift']:+.2f} {rel}".rstrip() + (" experimental" if self.experimental else "")

    @property
    def measured(self) -> float | None:
        """The harmonic mean `morph eval` measured for this feature (None: not evaluated)."""
        ev = self.scores.get("eval")
        v = ev.get("hmean") if isinstance(ev, dict) else None
        return float(v) if isinstance(v, (int, float)) else None

    def load_vector(self) -> ControlVector:
        assert self.path is not None
        return ControlVector.load(self.path)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("source")
        d.pop("path")
        return d


def _read_manifest(directory: Path, source: str) -> list[Feature]:
    path = directory / MANIFEST
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
        raise MorphError(f"{path}: unreadable features manifest ({e})") from None
    entries = raw.get("features", []) if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        raise MorphError(f"{path}: not a features manifest (no list of features)")
    out = []
    known = set(Feature.__dataclass_fields__) - {"source", "path"}
    for entry in entries:
        if not isinstance(entry, dict):
            raise MorphError(f"{path}: a feature entry is not a JSON object")
        kw = {k: v for k, v in entry.items() if k in known}
        try:
            f = Feature(**kw)
        except TypeError as e:
            raise MorphError(f"{path}: bad feature entry {entry.get('name')!r} ({e})") from None
        bad = _bad_field(f)
        if bad:
            raise MorphError(f"{path}: bad feature entry {entry.get('name')!r} ({bad})")
        f.source = source
        f.path = directory / f.file
        out.append(f)
    return out


def _bad_field(f: Feature) -> str | None:
    """What is wrong with an entry's field types (a hand-edited or corrupted manifest), if anything."""
    def num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    checks = [
        ("name", isinstance(f.name, str) and f.name != ""), ("description", isinstance(f.description, str)),
        ("method", isinstance(f.method, str) and f.method != ""), ("explanation", isinstance(f.explanation, str)),
        ("file", isinstance(f.file, str) and f.file != "" and not Path(f.file).is_absolute()
         and ".." not in Path(f.file).parts),
        ("layer", isinstance(f.layer, int) and not isinstance(f.layer, bool)),
        ("default_scale", num(f.default_scale) and abs(f.default_scale) <= MAX_SCALE),  # the one limit
        ("residual_norm", f.residual_norm is None or num(f.residual_norm)),
        ("experimental", isinstance(f.experimental, bool)),
        ("latents", isinstance(f.latents, list) and all(isinstance(j, int) for j in f.latents)),
        ("latent_weights", isinstance(f.latent_weights, list) and all(num(w) for w in f.latent_weights)),
        ("scores", isinstance(f.scores, dict)),
    ]
    wrong = [name for name, ok in checks if not ok]
    return f"wrong type or value: {', '.join(wrong)}" if wrong else None


def write_entries(directory: Path, features: Iterable[Feature], model_id: str, extra: dict | None = None,
                  replace_method: str | None = None) -> Path:
    """Merge `features` into directory/features.json (same name+method replaced), atomically.
    replace_method: drop every existing entry of that method first, and the vector files
    only they named (a new SAE makes the old SAE's features meaningless)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MANIFEST
    current: dict = {"model_id": model_id, "features": []}
    if path.is_file():
        current = json.loads(path.read_text(encoding="utf-8"))
    new = {f.key: f.to_json() for f in features}
    kept = [e for e in current.get("features", [])
            if f"{e['name']}@{e['method']}" not in new and e["method"] != replace_method]
    dropped = {e["file"] for e in current.get("features", []) if e["method"] == replace_method}
    current["features"] = sorted(kept + list(new.values()), key=lambda e: (e["name"], e["method"]))
    current["model_id"] = model_id
    if extra:
        current.update(extra)
    fsutil.write_json(path, current)
    for name in dropped - {e["file"] for e in current["features"]}:
        (directory / name).unlink(missing_ok=True)
    return path


class Catalog:
    def __init__(self, model_id: str, dirs: list[tuple[Path, str]] | None = None):
        self.model_id = model_id
        if dirs is None:
            dirs = [
                (paths.shipped_vectors_dir() / model_id, "shipped"),
                (paths.user_vectors_dir() / model_id, "user"),
            ]
        by_key: dict[str, Feature] = {}
        for d, source in dirs:  # later dirs override earlier ones
            for f in _read_manifest(d, source):
                by_key[f.key] = f
        self.features = sorted(by_key.values(), key=lambda f: (f.name, METHOD_PREFERENCE.index(f.method) if f.method in METHOD_PREFERENCE else 9))

    def names(self) -> list[str]:
        return sorted({f.name for f in self.features})

    def get(self, spec: str, experimental: bool = False) -> Feature:
        """`formal` (the best measured method) or `formal@diffmean`. Experimental features
        only with experimental=True."""
        name, _, method = spec.partition("@")
        cands = [f for f in self.features if f.name == name and (not method or f.method == method)]
        if not cands:
            avail = ", ".join(self.names()) or "none"
            if method and any(f.name == name for f in self.features):
                methods = ", ".join(f.method for f in self.features if f.name == name)
                raise MorphError(f"feature {name!r} has no {method!r} version (has: {methods})")
            raise MorphError(f"unknown feature {name!r} for {self.model_id} (available: {avail})")
        usable = cands if experimental else [f for f in cands if not f.experimental]
        if not usable:
            f = cands[0]
            raise MorphError(f"feature {f.key} is experimental (it falls short of the quality goal: "
                             f"`morph features show {f.key}`); pass --experimental to use it")
        return min(usable, key=_rank)

    def search(self, query: str) -> list[Feature]:
        q = query.lower()
        return [
            f for f in self.features
            if q in f.name.lower() or q in f.description.lower() or q in f.explanation.lower()
        ]


def _rank(f: Feature) -> tuple:
    """Measured features first, best score first; then the method preference."""
    m = f.measured
    pref = METHOD_PREFERENCE.index(f.method) if f.method in METHOD_PREFERENCE else len(METHOD_PREFERENCE)
    return (m is None, -(m or 0.0), pref)
