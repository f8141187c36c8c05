"""The steering request: which features, how strong, where the vector applies, read once.

Every way in makes one: `-f`/`--apply` on the command line, the REPL's and the editor's
commands, and the `"steering"` field that `morph serve` and `vllm serve` (with morph's
plugin) accept in a request body:

    "steering": {"features": {"formal": 0.3, "concise": null} | ["formal=0.3", "concise"],
                 "apply": "all" | "generated" | "prompt-scaled[:F]",  # default: the framing's
                 "mode": "residual" | "logits",                        # default residual
                 "experimental": false,
                 "choose": true | false}  # default: choose where it can (morph serve's ladder)

`parse` checks a body's field once, at the door (a bad value is a FieldError naming the
field); `apply_factors` is the one rule both engines follow for `apply`: (factor on
prompt positions, factor on generated ones).

- "all": every position, prompt included: llama.cpp's `--control-vector`.
- "generated": the prompt is evaluated unsteered and the vector is added from the first
  generated token on (that token still comes from the unsteered prompt's logits, as in
  contrastive activation addition). Rewrites keep their meaning better at strong scales,
  with a smaller style shift (FACTS).
- "prompt-scaled[:F]": F (default PROMPT_SCALE) x the vector on the prompt, all of it on
  generated tokens: the input is read mostly as written, the generation starts steered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from morph.errors import FieldError, MorphError, kind_of
from morph.steering.profile import FILE_PREFIX

APPLY_MODES = ("all", "generated", "prompt-scaled")
PROMPT_SCALE = 0.5  # "prompt-scaled": the prompt's share of the vector unless ":F" says
STEERING_MODES = ("residual", "logits")
FIELDS = ("features", "apply", "mode", "experimental", "choose")


def apply_factors(apply: str) -> tuple[float, float]:
    """(factor on prompt positions, factor on generated positions) for an `apply` value."""
    mode, _, arg = (apply or "all").partition(":") if isinstance(apply, str) else ("?", "", "")
    if mode == "all" and not arg:
        return 1.0, 1.0
    if mode == "generated" and not arg:
        return 0.0, 1.0
    if mode == "prompt-scaled":
        try:
            f = float(arg) if arg else PROMPT_SCALE
        except ValueError:
            f = -1.0
        if 0.0 <= f <= 1.0:
            return f, 1.0
    raise MorphError(f"steering applies to 'all', 'generated' or 'prompt-scaled[:F]' (0<=F<=1), not {apply!r}")


@dataclass
class SteeringRequest:
    """A request's steering, checked (resolving the features needs the catalog: profile.py)."""

    features: dict[str, float | None]  # spec -> scale (None: the feature's default)
    apply: str | None = None  # None: the framing's default (tasks.py)
    mode: str = "residual"
    experimental: bool = False
    choose: bool | None = None  # None: as the server decides (morph serve: the ladder where it applies)


def parse(v: Any) -> SteeringRequest | None:
    """A body's `steering` value -> SteeringRequest (None when absent); FieldError if bad."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise FieldError(f"'steering' must be an object, got {kind_of(v)}", "steering")
    unknown = set(v) - set(FIELDS)
    if unknown:
        raise FieldError(f"'steering' has unknown field(s): {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(FIELDS)})", "steering")
    req = SteeringRequest(_features(v.get("features")))
    for key, kind, what in (("apply", str, "a string"), ("mode", str, "a string"),
                            ("experimental", bool, "true or false"), ("choose", bool, "true or false")):
        if v.get(key) is not None and not isinstance(v[key], kind):
            raise FieldError(f"'steering.{key}' must be {what}, got {kind_of(v[key])}", f"steering.{key}")
    req.mode = v.get("mode") or "residual"
    req.experimental = bool(v.get("experimental"))
    req.choose = v.get("choose")
    if req.mode not in STEERING_MODES:
        raise FieldError(f"'steering.mode' must be one of {', '.join(STEERING_MODES)}, got {req.mode!r}",
                         "steering.mode")
    req.apply = v.get("apply")
    if req.mode == "logits" and req.apply not in (None, "generated"):
        raise FieldError("'steering.apply' must be \"generated\" (or left out) with mode \"logits\": "
                         "a logit bias acts on sampled tokens only", "steering.apply")
    if req.apply is not None:
        try:
            apply_factors(req.apply)
        except MorphError as e:
            raise FieldError(f"'steering.apply': {e}", "steering.apply") from None
    return req


def _features(feats: Any) -> dict[str, float | None]:
    if feats is None:
        feats = {}
    if isinstance(feats, str):
        feats = [feats]
    if isinstance(feats, list):
        if not all(isinstance(s, str) for s in feats):
            raise FieldError("'steering.features' as an array holds spec strings like \"formal=0.3\"",
                             "steering.features")
        feats = {s: None for s in feats}
    if not isinstance(feats, dict):
        raise FieldError(f"'steering.features' must be an object of name -> scale, got {kind_of(feats)}",
                         "steering.features")
    out: dict[str, float | None] = {}
    for name, scale in feats.items():
        if name.strip().lower().startswith(FILE_PREFIX):
            raise FieldError("'steering.features': vector files are not accepted over HTTP "
                             "(install them as features: `morph vectors`)", "steering.features")
        if isinstance(scale, str) and scale.strip().lower() == "default":
            scale = None
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale)):
            raise FieldError(f"'steering.features' scale for {name!r} must be a number or null (default), "
                             f"got {kind_of(scale)}", "steering.features")
        out[name] = None if scale is None else float(scale)
    return out
