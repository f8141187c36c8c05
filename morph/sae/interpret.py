"""Self-explanation: the model describes a direction of its own residual stream in words.

After Kharlapenko et al. 2024 ("Self-explaining SAE features"; SelfIE, Patchscopes): a
prompt asks what a placeholder word means; the residual stream at the placeholder's
positions is *replaced* by the direction (a latent's decoder row or a feature's vector)
at an early block (~1/10 of the depth, where the model still reads the position as a
word), stretched to `strength` x that block's median norm, and the model answers greedily.
The answer prefix ends in an opening quote, so the first answer token is already content.

The strength is swept (`STRENGTHS`): per strength, the rise of self-similarity (cosine of
the read block's residual at the last prompt token with the direction, over strength 0)
times the relative fall of the first answer token's entropy; the largest product picks
the strength the explanation is read at (none positive: the one nearest STRENGTH, marked
`fallback`). Each sequence is decoded alone, so a stored sweep equals a live one. What it
measures on SmolLM2, and that it does not predict steering scales:
vectors/smollm2-135m-instruct/README.md ("Self-explanation scales").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from morph.engine.generate import Job, generate
from morph.errors import MorphError

CHAT_QUESTION = 'What does the word "{w}" mean? Answer in a few words.'
CHAT_ANSWER = 'The word "{w}" means "'
BASE_PROMPT = 'The meaning of the word "{w}" is "'
STRENGTHS = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)  # multiples of the insert block's median norm
STRENGTH = 3.0  # the fixed strength used before the sweep (and by `explain` without one)
DEPTH = 0.1  # insert layer as a fraction of the blocks
MAX_TOKENS = 12
VERSION = 2  # of the stored self-explanation fields (1: fixed strength, no sweep)


# --- the prompt ---------------------------------------------------------------------------

def prompt_tokens(engine, word: str) -> list[int]:
    if engine.info.has_chat_template:
        text = engine.format_chat([{"role": "user", "content": CHAT_QUESTION.format(w=word)}])
        text += CHAT_ANSWER.format(w=word)
        return engine.tokenize(text, add_bos=False, special=True)
    return engine.tokenize(BASE_PROMPT.format(w=word))


def placeholder_positions(engine) -> tuple[list[int], list[int]]:
    """(prompt tokens, positions of the placeholder) for the model's prompt."""
    a = prompt_tokens(engine, "X")
    b = prompt_tokens(engine, "Q")
    if len(a) != len(b):
        raise RuntimeError("placeholder words tokenise differently")
    return a, [i for i, (x, y) in enumerate(zip(a, b)) if x != y]


def insert_layer(engine) -> tuple[int, float]:
    """(block to write at, its median residual norm on a few corpus openings)."""
    from morph.sae.corpus import load_prompts

    layer = max(1, round(DEPTH * engine.n_layer))
    acts = engine.capture([p["text"] for p in load_prompts()[:8]], layer)
    return layer, float(np.median(np.linalg.norm(np.concatenate(acts), axis=1)))


@dataclass(frozen=True)
class Probe:
    """Where a direction is written and read: the prompt, its placeholder positions, the
    insert block and its median residual norm, and the read block (the SAE layer)."""

    tokens: tuple[int, ...]
    where: tuple[int, ...]
    insert_layer: int
    insert_norm: float
    read_layer: int

    def to_json(self) -> dict:
        return {"version": VERSION, "insert_layer": self.insert_layer, "insert_norm": round(self.insert_norm, 4),
                "read_layer": self.read_layer, "prompt_tokens": len(self.tokens),
                "placeholder": list(self.where)}


def make_probe(engine, read_layer: int, layer: int | None = None, residual_norm: float | None = None) -> Probe:
    if not 0 <= read_layer < engine.n_layer - 1:
        # the last block's output exists only for rows that produce logits
        raise MorphError(f"read layer {read_layer} is outside 0..{engine.n_layer - 2}")
    if layer is None or residual_norm is None:
        layer, residual_norm = insert_layer(engine)
    toks, where = placeholder_positions(engine)
    if not where:
        raise MorphError("the self-explanation prompt has no placeholder position")
    return Probe(tuple(toks), tuple(where), int(layer), float(residual_norm), int(read_layer))


# --- the sweep ----------------------------------------------------------------------------

@dataclass
class Sweep:
    """One direction's self-explanation sweep (lists follow `strengths`)."""

    strengths: list[float]
    self_similarity: list[float]
    entropy: list[float]
    composite: list[float] = field(default_factory=list)
    chosen: int = 0  # index into strengths
    explanation: str = ""

    @property
    def strength(self) -> float:
        return self.strengths[self.chosen]

    @property
    def fallback(self) -> bool:
        """No strength had a positive composite: the fixed STRENGTH (nearest) was used."""
        return not any(c > 0 for c in self.composite)

    def to_json(self) -> dict:
        return {"strengths": list(self.strengths), "self_similarity": _r(self.self_similarity),
                "entropy": _r(self.entropy), "composite": _r(self.composite), "strength": self.strength,
                "fallback": self.fallback, "explanation": self.explanation}

    @classmethod
    def from_json(cls, d: dict) -> "Sweep":
        s = cls([float(x) for x in d["strengths"]], [float(x) for x in d["self_similarity"]],
                [float(x) for x in d["entropy"]], [float(x) for x in d.get("composite", [])],
                explanation=str(d.get("explanation", "")))
        s.chosen = s.strengths.index(float(d["strength"])) if "strength" in d else choose(s)[1]
        if not s.composite:
            s.composite = choose(s)[0]
        return s


def _r(xs: Sequence[float], nd: int = 4) -> list[float]:
    return [round(float(x), nd) for x in xs]


def choose(sw: Sweep) -> tuple[list[float], int]:
    """(composite per strength, index of the chosen strength); see the module docstring.
    The grid must start at strength 0 (the blank-word baseline both factors refer to)."""
    if not sw.strengths or sw.strengths[0] != 0.0:
        raise MorphError("a self-explanation sweep starts at strength 0 (the baseline)")
    ss0, h0 = sw.self_similarity[0], sw.entropy[0]
    comp = [0.0]
    for s, h in zip(sw.self_similarity[1:], sw.entropy[1:]):
        rise = max(s - ss0, 0.0)
        drop = max((h0 - h) / h0, 0.0) if h0 > 0 else 0.0
        comp.append(rise * drop)
    if len(comp) == 1:
        return comp, 0
    best = max(range(1, len(comp)), key=lambda i: (comp[i], -i))
    if comp[best] <= 0.0:  # no strength both reaches the read block and sharpens the answer
        best = min(range(1, len(comp)), key=lambda i: (abs(sw.strengths[i] - STRENGTH), i))
    return comp, best


def _entropy(logits: np.ndarray) -> float:
    x = logits.astype(np.float64)
    x = x - x.max()
    p = np.exp(x)
    z = p.sum()
    return float(math.log(z) - (p * x).sum() / z)


def _unit(directions: np.ndarray) -> np.ndarray:
    d = np.atleast_2d(np.asarray(directions, dtype=np.float32))
    n = np.linalg.norm(d, axis=1, keepdims=True)
    if not np.all(np.isfinite(n)) or np.any(n == 0):
        raise MorphError("cannot explain a zero or non-finite direction")
    return d / n


def check_strengths(strengths: Sequence[float]) -> list[float]:
    out = [float(a) for a in strengths]
    if (not out or out[0] != 0.0 or any(b <= a for a, b in zip(out, out[1:]))
            or not all(math.isfinite(a) for a in out)):
        raise MorphError("self-explanation strengths must start at 0 and increase")
    return out


def sweep(engine, directions: np.ndarray, probe: Probe, strengths: Sequence[float] = STRENGTHS,
          progress: Callable[[int], None] | None = None) -> list[Sweep]:
    """Self-similarity and first-token entropy of every row of `directions` at every
    strength (each sequence decoded alone, so results do not depend on the batch); each
    Sweep's composite and chosen strength are set, its explanation is not."""
    strengths = check_strengths(strengths)
    units = _unit(directions)
    read: dict[int, np.ndarray] = {}  # job -> the read block's row at the last prompt token

    def on_rows(i, pos, acts):
        if pos[-1] == len(probe.tokens) - 1:
            read[i] = acts[probe.read_layer][-1].astype(np.float64)

    def job(vec: np.ndarray) -> Job:
        return Job(list(probe.tokens), max_tokens=1, capture=(probe.read_layer,), keep_first_logits=True,
                   replace=(probe.insert_layer, probe.where, vec))

    # strength 0 writes zeros: the same prompt for every direction, run once
    jobs = [job(np.zeros(engine.n_embd, np.float32))]
    jobs += [job((u * (a * probe.insert_norm)).astype(np.float32)) for u in units for a in strengths[1:]]
    per = len(strengths) - 1

    def on_done(i, _out):
        if progress and i and i % per == 0:  # a direction's last strength
            progress(1)

    with _runner(engine, probe.tokens) as runner:
        outs = generate(runner, jobs, on_rows=on_rows, on_done=on_done)
    out: list[Sweep] = []
    for k, u in enumerate(units):
        idx = [0] + [1 + k * per + j for j in range(per)]
        ss = [float(read[i] @ u / (np.linalg.norm(read[i]) + 1e-12)) for i in idx]
        sw = Sweep(strengths, ss, [_entropy(outs[i].first_logits) for i in idx])
        sw.composite, sw.chosen = choose(sw)
        out.append(sw)
    return out


def _runner(engine, tokens):
    """One sequence at a time: rows decoded together in one batch get slightly different
    numbers (KL ~0.003-0.005 to the prompt alone), so a stored sweep equals a live one."""
    n = len(tokens)
    return engine.batch_runner(n_seq=1, n_ctx=256 * math.ceil((n + MAX_TOKENS + 8) / 256), n_batch=max(64, n),
                               unified=False)


# --- the explanation ----------------------------------------------------------------------

def explain(engine, directions: np.ndarray, layer: int | None = None, residual_norm: float | None = None,
            strength: float | Sequence[float] = STRENGTH, progress: Callable[[int], None] | None = None,
            probe: Probe | None = None) -> list[str]:
    """One short description per row of `directions`, written at `layer` (default: the
    early insert layer) as `strength` x `residual_norm` (that layer's median norm);
    `strength` may be one value per row. Greedy, each sequence decoded alone."""
    units = _unit(directions)
    if probe is None:
        if layer is None or residual_norm is None:
            layer, residual_norm = insert_layer(engine)
        toks, where = placeholder_positions(engine)
    else:
        toks, where = list(probe.tokens), list(probe.where)
        layer, residual_norm = probe.insert_layer, probe.insert_norm
    per_row = np.broadcast_to(np.asarray(strength, dtype=np.float64), (len(units),))
    jobs = [Job(list(toks), max_tokens=MAX_TOKENS, until=lambda ids: _done(engine.detokenize(ids)),
                replace=(layer, where, (u * (float(a) * residual_norm)).astype(np.float32)))
            for u, a in zip(units, per_row)]
    with _runner(engine, toks) as runner:
        outs = generate(runner, jobs, on_done=(lambda i, o: progress(1)) if progress else None)
    return [_clean(o.text) for o in outs]


def self_explain(engine, directions: np.ndarray, probe: Probe, strengths: Sequence[float] = STRENGTHS,
                 progress: Callable[[int], None] | None = None) -> list[Sweep]:
    """Sweep every row of `directions`, then explain each at its chosen strength."""
    sweeps = sweep(engine, directions, probe, strengths, progress=progress)
    texts = explain(engine, directions, strength=[s.strength for s in sweeps], probe=probe)
    for s, t in zip(sweeps, texts):
        s.explanation = t
    return sweeps


def _done(text: str) -> bool:
    t = text.strip()
    return "\n" in t or t.endswith(".") or t.endswith('."')


def _clean(text: str) -> str:
    """The answer's first line, without quotes or a trailing period."""
    t = text.strip().split("\n")[0].strip()
    return t.replace('"', "").strip().rstrip(".").strip()


# --- one feature or latent, live (`morph features explain`) --------------------------------

@dataclass
class Target:
    """What `morph features explain` explains: a named feature or an SAE latent."""

    label: str  # "formal@sae" | "latent 23"
    direction: np.ndarray  # at `read_layer`
    read_layer: int
    feature: object | None = None  # catalog Feature
    latent: int | None = None
    evidence: tuple | None = None  # (evidence, manifest "sae" block, directory) for a latent


def resolve_target(catalog, spec: str) -> Target:
    """NAME, NAME@METHOD, ID or latent:ID -> the direction to explain and the block it lives at."""
    from morph.sae import evidence as ev_mod
    from morph.sae.io import load_sae

    j = ev_mod.parse_latent(spec)
    if j is not None:
        found = ev_mod.find_evidence(catalog.model_id)
        if found is None:
            raise MorphError(f"no SAE for {catalog.model_id}; build one with `morph vectors build`")
        ev, sae_block, directory = found
        ev_mod.latent_record(ev, j)  # the range check, one clear line
        sae = load_sae(directory / sae_block["file"])
        return Target(f"latent {j}", sae.W_dec[j].copy(), int(sae.meta["layer"]), latent=j,
                      evidence=found)
    # Explaining is not steering: experimental features are explained too.
    f = catalog.get(spec, experimental=True)
    cv = f.load_vector()
    if f.layer not in cv.directions:
        raise MorphError(f"{f.path}: the vector of {f.key} has no direction at its layer {f.layer}")
    return Target(f.key, cv.directions[f.layer].copy(), f.layer, feature=f)


def explain_target(engine, target: Target, strengths: Sequence[float] = STRENGTHS) -> tuple[Probe, Sweep]:
    probe = make_probe(engine, target.read_layer)
    return probe, self_explain(engine, target.direction[None, :], probe, strengths)[0]


def record(probe: Probe, sw: Sweep) -> dict:
    """The stored form: the probe and the sweep (`scores.self_explanation` of a feature,
    `self_explanation` of a latent's evidence record)."""
    return {"probe": probe.to_json(), **sw.to_json()}


def save(target: Target, probe: Probe, sw: Sweep) -> str:
    """Store the result where the feature or latent lives; returns the file written."""
    from morph.sae import evidence as ev_mod
    from morph.steering.catalog import write_entries

    rec = record(probe, sw)
    if target.latent is not None:
        ev, sae_block, directory = target.evidence
        lat = ev["latents"][target.latent]
        lat["explanation"] = sw.explanation
        lat["self_explanation"] = rec
        path = directory / sae_block["evidence"]
        _writable(path)
        ev_mod.save_evidence(ev, path)
        return str(path)
    f = target.feature
    f.scores = dict(f.scores) | {"self_explanation": rec}
    directory = f.path.parent
    _writable(directory / "features.json")
    model_id = _manifest_model_id(directory)
    return str(write_entries(directory, [f], model_id))


def _writable(path) -> None:
    import os

    if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK):
        raise MorphError(f"{path}: not writable; cannot store the self-explanation there")


def _manifest_model_id(directory) -> str:
    import json

    raw = json.loads((directory / "features.json").read_text(encoding="utf-8"))
    return str(raw.get("model_id", directory.name))
