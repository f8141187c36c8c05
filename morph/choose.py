"""Steer, check, choose: a rewrite's strength picked per input by measuring the candidates.

How strong a feature can push depends on the input: a strength that makes one email
formal turns the next one's facts around. So a rewrite is generated at several rungs in
one batch (the vector at increasing strengths, the style instruction, instruction plus
vector), each candidate is checked, and the strongest one that keeps the meaning wins
(Prompt-and-Rerank, Suzgun et al. 2022: candidates reranked by meaning x style).

- **Meaning**: token alignment with the input (BERTScore-style F1 over all-MiniLM-L6-v2's
  token embeddings) and lexical retention of the input's numbers, names and content
  words (morph.meaning). Thresholds from morph eval's tuning half.
- **Style**: each feature's own direction read from the candidate's tokens by the
  *unsteered* model: the feature's block output before the vector is added, captured
  while the candidate is generated (a vector added at block L changes nothing at or
  below L, so the read is the unsteered model's, in the candidate's own context).
  Measured against morph eval's judge on the tuning half, it ranks a ladder's candidates
  better than a classifier on the sentence embedding (EVAL.md). Concise is read by length
  instead (LENGTH_READ).

The ladder runs with the vector on the generated tokens only ("generated"), so its rungs
share two prompt evaluations (with and without the instruction) instead of one each.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import numpy as np

from morph import meaning, tasks
from morph.engine.base import Timings, apply_factors
from morph.engine.generate import Job, generate, runner_for
from morph.errors import MorphError
from morph.steering.vector import ControlVector

LADDER_APPLY = "generated"


@dataclass(frozen=True)
class Rung:
    """One candidate's recipe: the features' vectors at `scale` (absolute, a fraction of
    the residual norm; 0: none) and, if `instructed`, the style instruction in the prompt."""

    name: str
    scale: float
    instructed: bool = False


# Chosen on morph eval's tuning half (52 rewrites x 6 features, Gemma judge; EVAL.md): two
# vector strengths, the instruction alone and with two. Against 0.2/0.3/0.4/instruction/
# instruction+0.2 it moved formal, casual, concise and simple further at the same meaning
# check (formal 1.04x -> 1.20x the instruction's shift); the candidates cut at the input's
# line count keep strong rungs usable. (A 0.1 rung was never chosen: bench/choose.py.)
RUNGS: tuple[Rung, ...] = (
    Rung("0.3", 0.3),
    Rung("0.5", 0.5),
    Rung("instruction", 0.0, True),
    Rung("instruction+0.2", 0.2, True),
    Rung("instruction+0.3", 0.3, True),
)


PLAIN = Rung("plain", 0.0)  # unsteered: the meaning reference where there is no input to keep


@dataclass(frozen=True)
class Thresholds:
    """What a candidate must keep of its reference to count as saying the same thing."""

    token_f1: float = 0.65
    content: float = 0.4
    numbers: float = 1.0
    names: float = 1.0
    invented: int = 0  # names the reference never mentions


# A rewrite keeps its input; any other framing (chat, continue, expand, ...) is checked
# against what the model writes unsteered. Both chosen on morph eval's tuning half.
THRESHOLDS = {"rewrite": Thresholds(), "reference": Thresholds(token_f1=0.6, content=0.3)}


def rungs_for(framing: str) -> tuple[Rung, ...]:
    return RUNGS if framing == "rewrite" else (PLAIN, *RUNGS)


@dataclass(frozen=True)
class Feature:
    """A feature as the ladder needs it: its unit direction per block and its instruction."""

    key: str  # e.g. "formal@diffmean"
    vector: ControlVector  # the feature's vector at scale 1
    phrase: str  # "in a formal, polite, professional register"


@dataclass
class Candidate:
    rung: Rung
    text: str
    ids: list[int]
    finish: str
    style: float = 0.0  # the features' directions read from its tokens, standardised over the ladder
    reads: dict[str, float] = field(default_factory=dict)  # per feature: mean projection (unsteered read)
    token_f1: float = 0.0
    retention: meaning.Retention | None = None
    keeps_meaning: bool = False

    def scores(self) -> dict:
        return {"style": round(self.style, 3), "token_f1": round(self.token_f1, 3),
                "retention": self.retention.as_dict() if self.retention else None,
                "keeps_meaning": self.keeps_meaning}


@dataclass
class Choice:
    chosen: Candidate
    candidates: list[Candidate]
    timings: Timings | None = None  # the whole ladder: TTFT is the time to the choice

    @property
    def text(self) -> str:
        return self.chosen.text

    def as_dict(self) -> dict:
        """What -v prints, the history keeps and the server returns as `steering.chosen`."""
        return {"rung": self.chosen.rung.name, "scale": self.chosen.rung.scale,
                "instructed": self.chosen.rung.instructed, **self.chosen.scores(),
                "candidates": [{"rung": c.rung.name, **c.scores()} for c in self.candidates]}


def instruction(features: Sequence[Feature]) -> str:
    return " and ".join(f.phrase for f in features)


def combined(features: Sequence[Feature], scale: float) -> ControlVector | None:
    if scale == 0.0 or not features:
        return None
    out = features[0].vector * scale
    for f in features[1:]:
        out = out + f.vector * scale
    return out


def ladder_jobs(engine, framing: str, text: str, features: Sequence[Feature], *, defaults=None,
                rungs: Sequence[Rung] | None = None, **overrides) -> list[tuple[Rung, Job]]:
    """One generation job per rung, each the request `tasks.build_request` makes for the
    framing (the instructed ones with the style instruction), with the ladder's placement."""
    rungs = rungs_for(framing) if rungs is None else rungs
    if overrides.get("temperature") is None:
        # Greedy unless asked otherwise: the ladder is the search, and sampling inside it
        # only adds candidates that drift for no reason the checks can see.
        overrides["temperature"] = 0.0
    layers = {L for f in features for L in steered_layers(f.vector)}
    cap = rewrite_cap(len(engine.tokenize(text))) if framing == "rewrite" else None
    out = []
    for i, r in enumerate(rungs):
        req = tasks.build_request(framing, text, defaults=defaults, style=instruction(features) if r.instructed else None,
                                  steering=combined(features, r.scale), apply=LADDER_APPLY, **overrides)
        job = Job.from_request(engine, req)
        if job.temperature > 0 and job.seed is not None:
            job.seed = int(job.seed) + i  # one seed for all would give rungs that share a recipe one text
        job.capture = sorted(layers)
        job.capture_prompt = False
        if cap is not None:
            job.until = lambda ids, cap=cap: len(ids) > cap
            job.ends_at = lines_end(len(text.strip().splitlines()))
        out.append((r, job))
    return out


def lines_end(n_lines: int) -> Callable[[str], int]:
    """A rewrite has as many lines as its input: the text ends before a further non-empty
    line starts. What the model adds there is commentary ("I have rewritten this text..."),
    a reply to a one-line message, or a letter's sign-off; blank lines are not counted.
    (A letter's opening "Dear Dana," counts as a line: left uncounted, the letters that
    instructed candidates start ran on past the length cap on short inputs and were never
    chosen, at the cost of the whole batch decoding them.)"""
    def ends_at(text: str) -> int:
        seen, pos = 0, 0
        for line in text.splitlines(keepends=True):
            if line.strip():
                if seen == n_lines:
                    return len(text[:pos].rstrip())
                seen += 1
            pos += len(line)
        return -1
    return ends_at


def rewrite_cap(n_input_tokens: int) -> int:
    """A rewrite candidate still going past this many tokens is adding, not rewriting (the
    letters an instruction sometimes starts): it stops there and cannot be chosen. It also
    bounds the ladder's time by the input's length."""
    return int(1.5 * n_input_tokens) + 12


class Reads:
    """Collects each job's block outputs on its generated tokens (for `on_rows`), with the
    job's own vector taken back out, so what remains is the unsteered model's read."""

    def __init__(self, jobs: Sequence[Job], n_prompt: Sequence[int]):
        self.jobs = jobs
        self.n_prompt = n_prompt
        self.rows: list[dict[int, list[np.ndarray]]] = [{} for _ in jobs]

    def __call__(self, i: int, positions: np.ndarray, acts: dict[int, np.ndarray]) -> None:
        gen = positions >= self.n_prompt[i]
        if not gen.any():
            return
        job = self.jobs[i]
        factor = apply_factors(job.apply)[1]  # the vector's factor on generated tokens
        for L, a in acts.items():
            a = a[gen]
            if job.steering is not None and L in job.steering.directions and factor:
                a = a - np.float32(factor) * np.asarray(job.steering.directions[L], np.float32)
            self.rows[i].setdefault(L, []).append(a.copy())

    def mean(self, i: int, layer: int, unit: np.ndarray, n: int | None = None) -> float:
        """The mean projection over the job's first `n` generated tokens: those its text
        kept (a stop string or the line rule drops the ones decoded past the cut)."""
        parts = self.rows[i].get(layer)
        if not parts:
            return 0.0
        rows = np.concatenate(parts)[:n]
        return float((rows @ unit).mean()) if len(rows) else 0.0


def run(engine, embedder, framing: str, text: str, features: Sequence[Feature], *, defaults=None,
        rungs: Sequence[Rung] | None = None, cancel: threading.Event | None = None, **overrides) -> Choice:
    """Generate the ladder in one batch, check every candidate, return the choice. `text` is
    what the framing takes (the text to rewrite, the user's message, ...); `overrides` are
    Request fields and build_request's own keywords (history, scope, ...)."""
    t0 = time.perf_counter()
    pairs = ladder_jobs(engine, framing, text, features, defaults=defaults, rungs=rungs, **overrides)
    jobs = [j for _, j in pairs]
    reads = Reads(jobs, [len(j.tokens) for j in jobs])
    with runner_for(engine, jobs) as runner:
        outs = generate(runner, jobs, cancel=cancel, on_rows=reads, share_prefix=True)  # the two prompts' system prompt
    if cancel is not None and cancel.is_set():
        raise KeyboardInterrupt
    cands = [Candidate(r, o.text.strip(), o.ids, o.finish) for (r, _), o in zip(pairs, outs)]
    t_gen = time.perf_counter()
    n_words = len(text.split())
    for i, c in enumerate(cands):
        c.reads = {f.key: style_read(f, reads, i, c, n_words) for f in features}
    choice = choose_among(embedder, framing, text, cands)
    end = time.perf_counter()
    gen = sum(len(c.ids) for c in cands)
    choice.timings = Timings(prompt_tokens=len(jobs[0].tokens), evaluated_tokens=sum(
        len(t) for t in {tuple(j.tokens) for j in jobs}), gen_tokens=gen, ttft_s=end - t0,
        prompt_s=0.0, decode_s=t_gen - t0, total_s=end - t0)
    return choice


# Features whose concept is length: read by the candidate's length against the input's
# instead of their direction. On the tuning half, SmolLM2's read of concise's direction
# preferred candidates the judge found wordier (concise 1.50x the instruction's shift by the
# read, 2.02x by length, at the same meaning check); the other features' reads were better
# than length.
LENGTH_READ = {"concise": -1.0}


def style_read(f: Feature, reads: "Reads", i: int, c: Candidate, n_words: int) -> float:
    sign = LENGTH_READ.get(f.key.split("@")[0])
    if sign is not None:
        return sign * len(c.text.split()) / max(1, n_words)
    return reads.mean(i, *unit_direction(f), n=len(c.ids))


def describe(choice: Choice) -> str:
    """One line for -v: the rung chosen, its scores, and how many candidates kept the meaning."""
    c = choice.chosen
    r = c.retention
    kept = sum(x.keeps_meaning for x in choice.candidates)
    why = "" if c.keeps_meaning else " (none kept the meaning: the closest one)"
    return (f"chose {c.rung.name!r} of {len(choice.candidates)} candidates{why}: style {c.style:+.2f}, "
            f"token F1 {c.token_f1:.2f}, kept numbers {r.numbers:.0%} names {r.names:.0%} content "
            f"{r.content:.0%}; {kept} kept the meaning")


def steered_layers(v: ControlVector) -> list[int]:
    return [L for L in v.layers if np.any(v.directions[L])]


def unit_direction(f: Feature) -> tuple[int, np.ndarray]:
    """The block a feature is read at (its lowest steered block) and its unit direction there."""
    L = min(steered_layers(f.vector))
    v = np.asarray(f.vector.directions[L], np.float32)
    return L, v / max(float(np.linalg.norm(v)), 1e-12)


def choose_among(embedder, framing: str, text: str, cands: list[Candidate]) -> Choice:
    """The framing's rule: a rewrite is checked against its input; anything else against
    the unsteered candidate, which is then left out of the choice."""
    if framing == "rewrite":
        return pick(embedder, text, cands, THRESHOLDS["rewrite"])
    plain = next((c for c in cands if c.rung == PLAIN), None)
    if plain is None:
        raise MorphError("a ladder outside rewrites needs its unsteered candidate")
    choice = pick(embedder, plain.text, [c for c in cands if c is not plain], THRESHOLDS["reference"])
    return choice


def pick(embedder, source: str, cands: list[Candidate], thresholds: Thresholds) -> Choice:
    """Score meaning and style; the candidate with the most style among those that keep the
    meaning (none does: the one that keeps the most)."""
    if not cands:
        raise MorphError("no candidates to choose from")
    f1 = token_f1(embedder, source, [c.text for c in cands])
    for c, f in zip(cands, f1):
        c.token_f1 = f
        c.retention = meaning.retention(source, c.text)
        c.keeps_meaning = bool(c.text) and keeps(c, thresholds)
    keys = sorted({k for c in cands for k in c.reads})
    if keys:
        m = np.array([[c.reads.get(k, 0.0) for k in keys] for c in cands])
        z = (m - m.mean(axis=0)) / np.maximum(m.std(axis=0), 1e-9)
        for c, s in zip(cands, z.mean(axis=1)):
            c.style = float(s)
    ok = [c for c in cands if c.keeps_meaning]
    return Choice(max(ok, key=lambda c: c.style) if ok else closest(cands), cands)


def closest(cands: Sequence[Candidate]) -> Candidate:
    """Where no candidate keeps the meaning: one that ended on its own and invents no name,
    the best aligned with the source, the least styled on a tie."""
    return max(cands, key=lambda c: (c.finish != "until", not c.retention.invented, c.token_f1, -c.style))


def keeps(c: Candidate, t: Thresholds) -> bool:
    r = c.retention
    return (c.finish != "until" and c.token_f1 >= t.token_f1 and r.content >= t.content and r.numbers >= t.numbers
            and r.names >= t.names and len(r.invented) <= t.invented)


def token_f1(embedder, source: str, texts: Sequence[str]) -> list[float]:
    """BERTScore-style F1 of each text against `source`: each token's best cosine match in
    the other text, averaged both ways ([CLS]/[SEP] left out)."""
    src, *outs = embedder.token_embeddings([source, *texts])
    scores = []
    for t in outs:
        if len(t) == 0 or len(src) == 0:
            scores.append(0.0)
            continue
        sim = src @ t.T
        r, p = float(sim.max(axis=1).mean()), float(sim.max(axis=0).mean())
        scores.append(2 * r * p / (r + p) if r + p > 0 else 0.0)
    return scores


def ladder_features(catalog, steering, engine=None) -> list[Feature] | None:
    """The features a ladder varies: all of a profile's, each at its default scale and from
    the catalog. None (no ladder) when a scale was given or a vector file is in it: an
    explicit `=SCALE` is honoured exactly."""
    if steering is None or not steering.profile or steering.explicit:
        return None
    if engine is not None and not getattr(engine, "runs_ladders", True):
        return None  # the vLLM engine's batch runner edits only a sequence's first call
    out = []
    for key in steering.profile:
        f = catalog.get(key, experimental=True)  # already resolved (and allowed) by the profile
        out.append(Feature(key, f.load_vector(), tasks.style_phrase(f.name, f.description)))
    return out


class Ladder(NamedTuple):
    features: list[Feature]
    embedder: object  # the meaning check's (morph.engine.embed.Embedder)


def ladder_for(catalog, steering, open_embedder: Callable[[], object],
               on_fallback: Callable[[str], None], engine=None) -> Ladder | None:
    """What a ladder needs where the user left the strengths to morph: the features and the
    embedder. None means one generation: a scale was given (or a vector file), or the
    embedder cannot open (its package is missing), which `on_fallback` is told."""
    features = ladder_features(catalog, steering, engine)
    if not features:
        return None
    try:
        return Ladder(features, open_embedder())
    except MorphError as e:
        on_fallback(str(e))
        return None
