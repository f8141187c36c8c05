"""TEMPORARY (deleted once main has profile.py, tasks.Defaults and Request.apply): the
shared interfaces the server is written against, filled in from what main has today."""

from __future__ import annotations

from dataclasses import dataclass, fields

from morph.engine import base

APPLY_MODES = getattr(base, "APPLY_MODES", ("all",))
HAS_APPLY = "apply" in {f.name for f in fields(base.Request)}

try:
    from morph.steering.profile import resolve  # noqa: F401
except ImportError:
    from morph.steering.vector import combine

    @dataclass(frozen=True)
    class Steering:
        profile: dict
        vector: object

    def resolve(catalog, info, requests, *, experimental=False):
        parts, profile = [], {}
        for spec, scale in requests.items():
            name, _, val = spec.partition("=")
            f = catalog.get(name)
            s = f.default_scale if (scale is None and not val) else float(scale if scale is not None else val)
            if abs(s) > 2.0:
                from morph.errors import MorphError
                raise MorphError(f"scale {s:g} is outside -2..2")
            cv = f.load_vector()
            cv.validate(info.n_embd, info.n_layer)
            parts.append((cv, s))
            profile[f.key] = s
        return Steering(profile, combine(parts))


def defaults(rt):
    d = getattr(rt, "defaults", None)
    if d is not None:
        return d

    class D:
        apply = {"chat": "all", "continue": "all"}

        @staticmethod
        def sampling_for(framing):
            return {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "repeat_penalty": 1.1,
                    "repeat_last_n": 64, "seed": None}

    return D()
