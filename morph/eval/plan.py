"""What gets measured: targets (a concept and the vectors that claim to steer it) and
conditions (how a request is steered), and the exact request each condition sends.

Requests are built by `morph.tasks`, the same code `morph steer` uses, with its shipped
sampling defaults (repeat penalty 1.1), made greedy and capped at 80 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from morph import tasks
from morph.engine.base import Request
from morph.eval.prompts import EvalPrompt
from morph.steering.vector import ControlVector

GEN = {"max_tokens": 80, "temperature": 0.0}  # greedy, 80 tokens; the rest: tasks' defaults
DEFAULT_SCALES = (0.5, 1.0, 1.5, 2.0)  # multiples of each vector's default scale
COMBO_SCALES = (1.0,)  # SAE plus prompting: at the default scale and the first apply mode only
STEERED = ("diffmean", "sae", "file")  # condition kinds that are one vector alone
KINDS = ("unsteered", "prompt", "diffmean", "sae", "sae+prompt", "file", "choose")
# "choose": what `morph steer -f NAME` prints at its default strength. For a rewrite, the
# ladder generated and chosen from by morph.choose; any other task runs no ladder in the
# product, so there it is the plain default (the bare name's vector at its default scale
# and the task's shipped placement).
DEFAULT_APPLY = "default"  # apply "default": each task's shipped placement (tasks.DEFAULT_APPLY), as `morph steer` does

@dataclass
class Source:
    """One vector that claims to steer a concept: a catalog feature or a user's file."""

    method: str  # "sae" | "diffmean" | "file"
    vector: ControlVector
    default_scale: float
    label: str  # e.g. "formal@sae" or the file path


@dataclass
class Target:
    concept: str  # the judge's pole name
    description: str = ""
    sources: dict[str, Source] = field(default_factory=dict)  # by method
    ladder: list | None = None  # [choose.Feature]: what a bare `-f CONCEPT` runs its ladder with
    bare: Source | None = None  # what a bare `-f CONCEPT` resolves to, at its default scale

    @property
    def phrase(self) -> str:
        return tasks.style_phrase(self.concept, self.description)


@dataclass(frozen=True)
class Condition:
    kind: str  # one of KINDS
    concept: str = ""  # "" for unsteered
    scale_x: float = 0.0  # multiple of the source's default scale (0: no vector)
    apply: str = "all"  # where the vector applies (Request.apply)

    @property
    def method(self) -> str | None:
        return {"sae+prompt": "sae"}.get(self.kind, self.kind if self.kind in (*STEERED, "choose") else None)

    @property
    def prompted(self) -> bool:
        return self.kind in ("prompt", "sae+prompt")

    @property
    def key(self) -> str:
        if self.kind in ("unsteered", "prompt", "choose"):
            return self.kind
        return f"{self.kind} x{self.scale_x:g} {self.apply}"


def apply_modes() -> tuple[str, ...]:
    """The application variants the engine implements (issue 10 item 2). `Request.apply`
    reached main before the engine honoured it (it was ignored: "generated" would silently
    measure "all"), so the modes count only once engine.base has `apply_factors`, the
    engine branch's one rule for them."""
    from morph.engine import base

    return tuple(base.APPLY_MODES) if hasattr(base, "apply_factors") else ("all",)


def plan(targets: list[Target], scales=DEFAULT_SCALES, applies=("all",), kinds=KINDS) -> list[Condition]:
    """Every condition to run, unsteered first (the reference every shift is taken from)."""
    out = [Condition("unsteered")]
    for t in targets:
        if "prompt" in kinds:
            out.append(Condition("prompt", t.concept))
        if "choose" in kinds and t.ladder:
            out.append(Condition("choose", t.concept, 1.0, DEFAULT_APPLY))
        for method in t.sources:
            for kind in (method, "sae+prompt") if method == "sae" else (method,):
                if kind not in kinds:
                    continue
                for a in (applies[:1] if kind == "sae+prompt" else applies):
                    for s in (COMBO_SCALES if kind == "sae+prompt" else scales):
                        out.append(Condition(kind, t.concept, float(s), a))
    return out


def build(prompt: EvalPrompt, cond: Condition, target: Target | None) -> Request:
    """The request `morph steer --mode TASK -f CONCEPT=SCALE --temperature 0 --max-tokens 80`
    sends for this condition (shipped sampling defaults, not the user's config.toml), with
    the style instruction for the prompting conditions: tasks' own prompted rewrite
    ("Rewrite this text <phrase>:"), and "(Written <phrase>.)" above a continue opening."""
    kw = dict(GEN)
    if cond.kind == "choose":
        if prompt.task == "rewrite":
            raise ValueError("a rewrite's choice is a ladder, not one request (run.ladder_outputs)")
        # No ladder outside rewrites: the bare name at its default scale and the task's placement.
        return tasks.build_request(prompt.task, prompt.text, steering=target.bare.vector * target.bare.default_scale,
                                   **kw)
    if cond.method is not None:
        src = target.sources[cond.method]
        kw["steering"] = src.vector * (src.default_scale * cond.scale_x)
        kw["apply"] = None if cond.apply == DEFAULT_APPLY else cond.apply  # None: tasks' default for the framing
    style = target.phrase if cond.prompted else None
    return tasks.build_request(prompt.task, prompt.text, style=style, **kw)


def plain(prompt: EvalPrompt) -> Request:
    """The un-instructed, unsteered request: the context every output's NLL is scored in."""
    return tasks.build_request(prompt.task, prompt.text, **GEN)


def targets_from_catalog(catalog, names: list[str] | None, known_concepts: list[str],
                         methods=("sae", "diffmean"), *, n_embd: int, n_layer: int) -> list[Target]:
    """One target per feature name (all of the catalog's when `names` is None), with each
    of its methods as a source, its vector checked against the model. Names the judge
    cannot score are an error when asked for by name and skipped otherwise."""
    from morph.errors import MorphError

    wanted = names if names is not None else [n for n in catalog.names() if n in known_concepts]
    out = []
    for name in wanted:
        if name not in known_concepts:
            raise MorphError(f"the judge cannot score {name!r} (it knows: {', '.join(sorted(known_concepts))})")
        feats = [f for f in catalog.features if f.name == name and f.method in methods]
        if not feats:
            avail = ", ".join(catalog.names()) or "none"
            raise MorphError(f"unknown feature {name!r} for {catalog.model_id} (available: {avail})")
        t = Target(name, feats[0].description)
        for f in feats:
            cv = f.load_vector()
            cv.validate(n_embd, n_layer, where=f"feature {f.key} ({f.path})")
            t.sources[f.method] = Source(f.method, cv, float(f.default_scale), f.key)
        t.ladder = ladder_of(catalog, name)
        if t.ladder:
            f = catalog.get(t.ladder[0].key, experimental=True)
            t.bare = Source(f.method, t.ladder[0].vector, float(f.default_scale), f.key)
        out.append(t)
    return out


def ladder_of(catalog, name: str) -> list:
    """The features `morph steer -f NAME` runs its ladder with (the profile the CLI builds
    for a bare name, through the product's own choose.ladder_features): the offered method,
    or with none offered what `--experimental` resolves it to."""
    from morph import choose
    from morph.errors import MorphError
    from morph.steering.profile import Profile

    for experimental in (False, True):
        p = Profile(catalog, experimental=experimental)
        try:
            p.apply(name)
        except MorphError:
            continue  # experimental: only with --experimental
        return choose.ladder_features(catalog, p.steering()) or []
    return []


def target_from_file(path: str, scale: float | None, concept: str | None, known_concepts: list[str],
                     n_embd: int, n_layer: int) -> Target:
    """A user's own control-vector file, measured against the judge's `concept`."""
    from morph.errors import MorphError

    cv = ControlVector.load(path)
    cv.validate(n_embd, n_layer, where=path)
    concept = concept or str(cv.meta.get("name") or "")
    if concept not in known_concepts:
        raise MorphError(f"{path}: say which concept it steers with --concept (one of: {', '.join(sorted(known_concepts))})")
    default = scale if scale is not None else float(cv.meta.get("default_scale") or 1.0)
    return Target(concept, str(cv.meta.get("description") or ""), {"file": Source("file", cv, default, path)})
