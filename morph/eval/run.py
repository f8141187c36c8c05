"""Run an evaluation: every (condition, prompt) through the product path, then scores.

Each (condition, prompt) is the request `morph steer` would send (see plan.build). By
default they run many at a time through the engine's batch runner (engine/generate.py:
the same prompt tokens, steering placement, greedy sampler and stop rule as `engine.stream`);
`sequential=True` runs each through `engine.stream` itself from a fresh KV cache, as in a
new `morph steer` process. Generations and NLLs are cached
(JSONL, keyed by the model, the exact prompt tokens, the sampling fields and the vector's
numbers), so an interrupted run resumes and a report can be redrawn without the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from morph.engine.base import collect
from morph.engine.generate import generate_requests
from morph.eval import plan as planmod
from morph.eval import probe, scores
from morph.eval.plan import Condition, Target
from morph.eval.prompts import EvalPrompt

CACHE_VERSION = 1
SHIFT_EPS = 0.05  # a prompt "moved" its concept when |shift| exceeds this

# Issue 20 item 6: what a feature must do on the report half, with choose on: a concept
# shift of at least 1.5x the style instruction's, relevance at least 0.9x the unsteered
# output's, never the wrong way. Fluency is held against the instruction's own output, not
# unsteered text (asking for a style in words costs the unsteered model's likelihood too:
# x1.1-1.6): NLL at most 1.2x the instruction's and repetition at most 0.05 above it.
GOAL = {"shift_vs_prompting": 1.5, "relevance_ratio_min": 0.9, "nll_vs_prompting_max": 1.2,
        "repetition_vs_prompting_max": 0.05}
# Issue 10 item 5's shipping gate for one vector at one scale, which set today's
# `experimental` flags (--write-features and the tuning of default scales still use it):
# shift >= the instruction's, relevance >= 0.85x, NLL <= 1.2x the unsteered output's.
GATE = {"relevance_ratio_min": 0.85, "nll_ratio_max": 1.2}


class Cache:
    """Append-only JSONL of {"k": key, "v": value}; later lines win."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict[str, dict] = {}
        if path is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by an interrupted write
                self.data[rec["k"]] = rec["v"]

    def get(self, key: str) -> dict | None:
        return self.data.get(key)

    def put(self, key: str, value: dict) -> None:
        self.data[key] = value
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"k": key, "v": value}) + "\n")


def _model_id(engine) -> dict:
    info = engine.info
    try:
        size = os.stat(info.file.path).st_size
    except OSError:
        size = None
    return {"fingerprint": info.fingerprint, "size": size, "engine": engine.name}


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def gen_key(engine, tokens: list[int], req, batched: bool = False) -> str:
    """Cache key of one generation; batched outputs are kept apart from the product
    path's (measured equal, but a cache should not assume it)."""
    fields = {f.name: getattr(req, f.name) for f in dataclasses.fields(req)
              if f.name not in ("prompt", "messages", "steering", "cancel")}
    vec = req.steering.fingerprint() if req.steering is not None else b""
    return _digest("gen", CACHE_VERSION, _model_id(engine), tokens, fields, vec, *(["batched"] if batched else []))


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def generate(engine, jobs: list[tuple[EvalPrompt, Condition, object]], cache: Cache, progress: bool = True,
             sequential: bool = False) -> list[dict]:
    """Outputs for jobs (prompt, condition, Request), in the jobs' order."""
    out: list[dict | None] = [None] * len(jobs)
    keys = [gen_key(engine, engine.prepare_tokens(req), req, batched=not sequential) for _, _, req in jobs]
    todo = []
    for i, key in enumerate(keys):
        out[i] = cache.get(key)
        if out[i] is None:
            todo.append(i)
    with _progress(len(jobs), "generate", progress) as bar:
        bar.update(len(jobs) - len(todo))
        if not sequential:
            def done(j: int, rec: dict) -> None:
                i = todo[j]
                cache.put(keys[i], rec)
                out[i] = rec
                bar.update(1)

            generate_requests(engine, [jobs[i][2] for i in todo],
                              on_done=lambda j, o: done(j, {"text": o.text, "ids": o.ids, "finish": o.finish}))
            return out  # type: ignore[return-value]

        def group(i):
            req = jobs[i][2]
            vec = hashlib.sha1(req.steering.fingerprint()).hexdigest() if req.steering is not None else ""
            return (vec, getattr(req, "apply", "all"), jobs[i][0].task != "rewrite", i)

        reset = getattr(engine, "reset_cache", None)
        for i in sorted(todo, key=group):
            if reset is not None:
                reset()  # as `morph steer` runs it: a fresh context (see LlamaEngine.reset_cache)
            c = collect(engine.stream(jobs[i][2]))
            rec = {"text": c.text, "ids": list(c.token_ids), "finish": c.finish_reason}
            cache.put(keys[i], rec)
            out[i] = rec
            bar.update(1)
    return out  # type: ignore[return-value]


def nlls(engine, items: list[tuple[EvalPrompt, list[int]]], cache: Cache, progress: bool = True) -> list[float]:
    """Mean NLL per token of each output (token ids) under the unsteered model, in the
    plain framing of its prompt's task. NaN for an empty output."""
    out: list[float] = [float("nan")] * len(items)
    ctx_of: dict[str, list[int]] = {}
    order = sorted(range(len(items)), key=lambda i: (items[i][0].id, i))  # one prompt's outputs in a row: its KV is reused
    with _progress(len(items), "score NLL", progress) as bar:
        for i in order:
            prompt, ids = items[i]
            if prompt.id not in ctx_of:
                ctx_of[prompt.id] = engine.prepare_tokens(planmod.plain(prompt))
            ctx = ctx_of[prompt.id]
            if ids:
                key = _digest("nll", CACHE_VERSION, _model_id(engine), ctx, ids)
                rec = cache.get(key)
                if rec is None:
                    lp = engine.continuation_logprobs(ctx, ids, None)
                    rec = {"nll": float(-np.mean(lp))}
                    cache.put(key, rec)
                out[i] = rec["nll"]
            bar.update(1)
    return out


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(xs)) if xs else float("nan")


def _r(x: float, n: int = 4):
    return None if x is None or not math.isfinite(x) else round(float(x), n)


def ladder_outputs(engine, embedder, items: list[tuple[EvalPrompt, Target]], cache: Cache,
                   progress: bool = True) -> list[dict]:
    """What `morph steer -f CONCEPT` prints for each rewrite (prompt, target): morph.choose.run
    itself, the product's call (its ladder in one batch, its checks, its choice), greedy with
    the eval's token limit. Each record keeps the rung chosen, every candidate's scores and
    text. Cached by the ladder's exact jobs, rungs and vectors, and the code that checks and chooses."""
    from morph import choose

    out = []
    code = _choice_code()
    with _progress(len(items), "choose", progress) as bar:
        for p, t in items:
            jobs = choose.ladder_jobs(engine, p.task, p.text, t.ladder, **planmod.GEN)
            key = _digest("choice", CACHE_VERSION, _model_id(engine), [(r, j.tokens, _job_fields(j)) for r, j in jobs],
                          code, [f.key for f in t.ladder], [f.vector.fingerprint() for f in t.ladder],
                          str(getattr(embedder, "path", "")))
            rec = cache.get(key)
            if rec is None:
                c = choose.run(engine, embedder, p.task, p.text, t.ladder, **planmod.GEN)
                rec = {"text": c.text, "ids": c.chosen.ids, "finish": c.chosen.finish, "chosen": c.as_dict(),
                       "candidates": {x.rung.name: x.text for x in c.candidates}}
                cache.put(key, rec)
            out.append(rec)
            bar.update(1)
    return out


def _choice_code() -> str:
    """The choice's own code (its thresholds, reads and rule): a change there changes the
    choice among the same candidates, so it is part of a ladder's cache key."""
    import inspect

    from morph import __version__, choose, meaning

    try:
        return _digest(inspect.getsource(choose), inspect.getsource(meaning))
    except OSError:  # no source files (the single executable): its version stands for its code
        return __version__


def _job_fields(job) -> dict:
    """A ladder job's generation fields for its cache key (its vector by fingerprint)."""
    keep = ("apply", "max_tokens", "stop", "temperature", "top_p", "top_k", "repeat_penalty", "repeat_last_n",
            "seed", "capture")
    return {k: getattr(job, k) for k in keep} | {"vec": job.steering.fingerprint().hex() if job.steering is not None else ""}


def evaluate(engine, judge, targets: list[Target], prompts: list[EvalPrompt], conditions: list[Condition],
             cache: Cache, progress: bool = True, sequential: bool = False, embedder=None) -> dict:
    """Generate, score and aggregate. Returns the results dict that report.py prints and writes.
    `embedder`: the choice's meaning check (the product's MiniLM embedder; default the
    judge's, which is the same model)."""
    by_concept = {t.concept: t for t in targets}
    ladder = [(c, p) for c in conditions if c.kind == "choose" for p in prompts if p.task == "rewrite"]
    jobs = [(p, c, planmod.build(p, c, by_concept.get(c.concept))) for c in conditions for p in prompts
            if not (c.kind == "choose" and p.task == "rewrite")]
    gens = generate(engine, jobs, cache, progress, sequential=sequential)
    if ladder:
        gens += ladder_outputs(engine, embedder if embedder is not None else judge.embed,
                               [(p, by_concept[c.concept]) for c, p in ladder], cache, progress)
        jobs += [(p, c, None) for c, p in ladder]
    uniq: dict[tuple[str, tuple], int] = {}
    for (p, _, _), g in zip(jobs, gens):
        uniq.setdefault((p.id, tuple(g["ids"])), len(uniq))
    pmap = {p.id: p for p in prompts}
    nll_u = nlls(engine, [(pmap[pid], list(ids)) for pid, ids in uniq], cache, progress)

    texts = [g["text"].strip() for g in gens]
    out_emb = judge.embed(texts)
    ref_emb = judge.embed([p.text for p, _, _ in jobs])
    rel = scores.relevance(out_emb, ref_emb)
    rel2 = None
    if isinstance(judge.features, probe.ProbeFeatures):  # relevance a second way, by a model the choice never used
        rel2 = probe.similarity(judge.features, texts, [p.text for p, _, _ in jobs])
    outputs = []
    for j, ((p, c, _), g) in enumerate(zip(jobs, gens)):
        nll = nll_u[uniq[(p.id, tuple(g["ids"]))]]
        outputs.append({
            "prompt": p.id, "task": p.task, "condition": c.key, "concept": c.concept,
            "text": g["text"], "n_tokens": len(g["ids"]), "finish": g["finish"],
            "relevance": float(rel[j]) if texts[j] else 0.0,
            "nll": nll, "repetition": scores.repetition(g["text"]),
            **({"chosen": g["chosen"]} if "chosen" in g else {}),
            **({"relevance_probe": float(rel2[j]) if texts[j] else 0.0} if rel2 is not None else {}),
        })
    # Concept scores: each output for its own concept; unsteered outputs for every concept.
    unsteered = {o["prompt"]: o for o in outputs if o["condition"] == "unsteered"}
    for t in targets:
        mine = [o for o in outputs if o["concept"] == t.concept]
        ref = [unsteered[p.id] for p in prompts]
        pc = judge.score([o["text"].strip() for o in mine + ref], t.concept)
        for o, v in zip(mine, pc[: len(mine)]):
            o["concept_score"] = float(v)
        for o, v in zip(ref, pc[len(mine):]):
            o.setdefault("concept_scores", {})[t.concept] = float(v)
    rows = aggregate(targets, prompts, conditions, outputs)
    return {"rows": rows, "outputs": outputs}


def _row(t: Target, c: Condition, prompts, outs: dict, base: dict) -> dict:
    """Metrics of one condition for one concept over the prompts (outs/base by prompt id)."""
    per = []
    for p in prompts:
        o, b = outs[p.id], base[p.id]
        c0 = b["concept_scores"][t.concept]
        cs = o["concept_scores"][t.concept] if c.kind == "unsteered" else o["concept_score"]
        fl = scores.fluency(o["nll"], b["nll"], o["repetition"])
        rel = o["relevance"]
        per.append({"task": p.task, "shift": cs - c0, "concept": cs, "rel": rel, "rel0": b["relevance"],
                    "nll": o["nll"], "nll0": b["nll"], "rep": o["repetition"], "fluency": fl,
                    "hmean": scores.hmean(cs, rel, fl),
                    "rel_p": o.get("relevance_probe"), "rel_p0": b.get("relevance_probe")})

    def summary(items):
        shifts = [x["shift"] for x in items]
        return {
            "n": len(items),
            "concept_score": _r(_mean(x["concept"] for x in items)),
            "concept_shift": _r(_mean(shifts)),
            "moved_toward": sum(s > SHIFT_EPS for s in shifts),
            "moved_away": sum(s < -SHIFT_EPS for s in shifts),
            "relevance": _r(_mean(x["rel"] for x in items)),
            "relevance_ratio": _r(_mean(x["rel"] for x in items) / max(1e-9, _mean(x["rel0"] for x in items))),
            "nll": _r(_mean(x["nll"] for x in items)),
            "nll_ratio": _r(_mean(x["nll"] for x in items) / max(1e-9, _mean(x["nll0"] for x in items))),
            "repetition": _r(_mean(x["rep"] for x in items)),
            "fluency": _r(_mean(x["fluency"] for x in items)),
            "hmean": _r(_mean(x["hmean"] for x in items)),
            **({"relevance_probe": _r(_mean(x["rel_p"] for x in items)),
                "relevance_probe_ratio": _r(_mean(x["rel_p"] for x in items) / max(1e-9, _mean(x["rel_p0"] for x in items)))}
               if items and all(x["rel_p"] is not None for x in items) else {}),
        }

    src = t.sources.get(c.method) if c.method else None
    row = {"concept": t.concept, "condition": c.key, "kind": c.kind, "method": c.method,
           "apply": c.apply if src else None, "scale_x": c.scale_x if src else None,
           "scale": _r(src.default_scale * c.scale_x, 4) if src else None,
           "source": src.label if src else None}
    if c.kind == "choose":  # per input on rewrites; the bare name's default elsewhere
        row["source"] = ",".join(f.key for f in t.ladder or [])
        row["rungs"] = dict(sorted(Counter(outs[p.id]["chosen"]["rung"] for p in prompts if "chosen" in outs[p.id]).items()))
    row.update(summary(per))
    row["by_task"] = {task: summary([x for x in per if x["task"] == task])
                      for task in sorted({x["task"] for x in per})}
    return row


def wrong_way(row: dict) -> bool:
    """Does not move its concept the right way: the mean shift is not positive, or no more
    prompts moved toward the concept than away from it (each by more than SHIFT_EPS). A
    vector that moves nothing (0 toward, 0 away) fails too: otherwise, where prompting
    does not move a concept either, any weak vector (a random one) passes."""
    s = row.get("concept_shift")
    return s is None or s <= 0 or row["moved_away"] >= row["moved_toward"]


def regoal(rows: list[dict]) -> list[dict]:
    """Recompute each steered row's goal and gate under the current rules (for re-read results)."""
    prompt_of = {r["concept"]: r for r in rows if r["kind"] == "prompt"}
    for r in rows:
        if r.get("method") is not None:
            _judge_row(r, prompt_of.get(r["concept"]))
    return rows


def _judge_row(r: dict, prompt_row: dict | None) -> None:
    p = prompt_row or {}
    r["nll_vs_prompting"] = _r(r["nll"] / p["nll"]) if r.get("nll") is not None and p.get("nll") else None
    r["goal"] = goal(r, prompt_row)
    r["gate"] = gate(r, prompt_row)


def goal(row: dict, prompt_row: dict | None) -> dict:
    """Issue 20 item 6 (GOAL) for one steered condition against its concept's prompting row."""
    p = prompt_row or {}

    def have(*xs):
        return all(x is not None for x in xs)

    shift, p_shift = row["concept_shift"], p.get("concept_shift")
    checks = {
        "beats_prompting": have(shift, p_shift) and shift >= GOAL["shift_vs_prompting"] * max(p_shift, 0.0),
        "keeps_relevance": have(row["relevance_ratio"]) and row["relevance_ratio"] >= GOAL["relevance_ratio_min"],
        "keeps_fluency": have(row.get("nll"), p.get("nll"), row.get("repetition"), p.get("repetition"))
        and row["nll"] <= GOAL["nll_vs_prompting_max"] * p["nll"]
        and row["repetition"] <= p["repetition"] + GOAL["repetition_vs_prompting_max"],
        "right_way": not wrong_way(row),
    }
    return {**checks, "meets_goal": all(checks.values())}


def gate(row: dict, prompt_row: dict | None) -> dict:
    """Issue 10 item 5's shipping gate (GATE), for one vector against its prompting baseline."""
    checks = {
        "beats_prompting": prompt_row is not None and row["concept_shift"] is not None
        and prompt_row["concept_shift"] is not None and row["concept_shift"] >= prompt_row["concept_shift"],
        "keeps_relevance": row["relevance_ratio"] is not None and row["relevance_ratio"] >= GATE["relevance_ratio_min"],
        "keeps_fluency": row["nll_ratio"] is not None and row["nll_ratio"] <= GATE["nll_ratio_max"],
        "right_way": not wrong_way(row),
    }
    return {**checks, "meets_goal": all(checks.values())}


def aggregate(targets: list[Target], prompts: list[EvalPrompt], conditions: list[Condition], outputs: list[dict]) -> list[dict]:
    by_cond: dict[tuple[str, str], dict] = {}
    for o in outputs:
        by_cond.setdefault((o["concept"], o["condition"]), {})[o["prompt"]] = o
    base = by_cond[("", "unsteered")]
    rows = []
    for t in targets:
        mine = [Condition("unsteered")] + [c for c in conditions if c.concept == t.concept]
        trows = [_row(t, c, prompts, by_cond[(c.concept, c.key)], base) for c in mine]
        prompt_row = next((r for r in trows if r["kind"] == "prompt"), None)
        for r in trows:
            if r["method"] is not None:
                _judge_row(r, prompt_row)
        rows.extend(trows)
    return rows


def _rank(r: dict) -> tuple:
    """Scales and methods are picked by the shipping gate (what set today's defaults)."""
    return (bool(r.get("gate", {}).get("meets_goal")), r["hmean"] if r["hmean"] is not None else -1.0)


def choose(rows: list[dict]) -> dict | None:
    """Of one concept's and method's rows: the best meeting the goal, else the best hmean."""
    return max(rows, key=_rank, default=None)


def select(rows: list[dict], tuned: dict | None = None) -> dict:
    """Per concept and method (vector alone, not combined with prompting): the row at the
    scale and apply chosen on the tuning half (`tuned`: {concept: {method: {"apply",
    "scale_x", "scale"}}}; the absolute scale wins, since a tuning run may have changed the
    default it is a multiple of) or, without one, at the default scale (x1) with the shipped
    placement ("default") where it was run, else applied everywhere ("all").
    Then the better method: one meeting the goal first, then the higher hmean."""
    out: dict[str, dict] = {}
    for concept in dict.fromkeys(r["concept"] for r in rows):
        methods: dict[str, dict] = {}
        for method in dict.fromkeys(r["method"] for r in rows if r["concept"] == concept and r["kind"] == r["method"]):
            cands = [r for r in rows if r["concept"] == concept and r["kind"] == method]
            if method == "choose":  # one row: the strength chosen per input
                methods[method] = cands[0]
                continue
            shipped = planmod.DEFAULT_APPLY if any(r["apply"] == planmod.DEFAULT_APPLY for r in cands) else "all"
            want = (tuned or {}).get(concept, {}).get(method) or {"apply": shipped, "scale_x": 1.0}
            if want.get("scale") is not None:  # an absolute scale (the tune run's): the same vector strength
                def near(r):
                    return abs(r["scale"] - want["scale"])
            else:
                def near(r):
                    return abs(r["scale_x"] - want["scale_x"])
            pick = [r for r in cands if r["apply"] == want["apply"] and near(r) < 1e-6]
            if not pick:  # the wanted point was not run: the nearest scale
                same = [r for r in cands if r["apply"] == want["apply"]] or cands
                pick = [min(same, key=near)]
            methods[method] = pick[0]
        # The method a bare name picks among the vectors (the choice is not one of them).
        best = max((r for m, r in methods.items() if m != "choose"), key=_rank, default=None)
        prompt_row = next((r for r in rows if r["concept"] == concept and r["kind"] == "prompt"), None)
        out[concept] = {"methods": methods, "best": best["method"] if best else None,
                        "tuned": tuned is not None and concept in tuned,
                        "prompting": prompt_row}
    return out


def tuned_choice(results: dict, apply: str | None = None) -> dict:
    """From a run on the tuning half: per concept and method, the apply mode and scale to
    report at (the best row meeting the goal, else the best hmean); `apply`: only rows
    with that placement (e.g. "default": the scale for the shipped placement)."""
    rows = results["rows"]
    out: dict[str, dict] = {}
    for r in rows:
        if r["method"] in (None, "choose") or r["kind"] != r["method"] or (apply is not None and r["apply"] != apply):
            continue
        out.setdefault(r["concept"], {}).setdefault(r["method"], [])
        out[r["concept"]][r["method"]].append(r)
    picks = {c: {m: choose(rs) for m, rs in ms.items()} for c, ms in out.items()}
    return {c: {m: {"apply": r["apply"], "scale_x": r["scale_x"], "scale": r.get("scale")} for m, r in ms.items()}
            for c, ms in picks.items()}


def apply_table(results: dict) -> dict:
    """Which placement keeps the meaning while moving the concept, per task, from a sweep
    of scales x apply modes (tuning half). For each task and apply mode, over every
    concept x method (vector alone), on that task's prompts:

    - meets: how many have some scale meeting the goal on this task;
    - kept_shift: the mean over them of the largest concept shift among the scales that
      keep relevance and fluency (0 where none does): how far the concept moves while
      the meaning holds;
    - relevance_ratio / nll_ratio / concept_shift: means over every scale.

    Only modes run for every concept x method are compared. `choice`: per task, the mode
    with the most meets, then the largest kept_shift, then the higher relevance."""
    rows = results["rows"]
    steered = [r for r in rows if r["method"] not in (None, "choose") and r["kind"] == r["method"]]
    prompt_of = {r["concept"]: r for r in rows if r["kind"] == "prompt"}
    sources = {(r["concept"], r["method"]) for r in steered}
    table: dict[str, dict] = {}
    for task in sorted({t for r in steered for t in r["by_task"]}):
        for a in dict.fromkeys(r["apply"] for r in steered):
            per: dict[tuple, list] = {}
            for r in steered:
                if r["apply"] == a and task in r["by_task"]:
                    s = r["by_task"][task]
                    p = prompt_of.get(r["concept"])
                    per.setdefault((r["concept"], r["method"]), []).append(
                        (s, gate(s, p["by_task"].get(task) if p else None)))
            if set(per) != sources:
                continue
            flat = [s for v in per.values() for s, _ in v]
            table.setdefault(task, {})[a] = {
                "n_sources": len(per), "n_rows": len(flat),
                "meets": sum(any(g["meets_goal"] for _, g in v) for v in per.values()),
                "kept_shift": _r(_mean(max([s["concept_shift"] for s, g in v
                                            if g["keeps_relevance"] and g["keeps_fluency"]] or [0.0])
                                       for v in per.values())),
                "concept_shift": _r(_mean(s["concept_shift"] for s in flat)),
                "relevance_ratio": _r(_mean(s["relevance_ratio"] for s in flat)),
                "nll_ratio": _r(_mean(s["nll_ratio"] for s in flat)),
            }
    choice = {t: max(m, key=lambda a: (m[a]["meets"], m[a]["kept_shift"] or 0.0, m[a]["relevance_ratio"] or 0.0))
              for t, m in table.items()}
    return {"by_task": table, "choice": choice}


def merge(parts: list[dict]) -> dict:
    """Results of several runs on the same prompts as one (a sweep run in parts): rows and
    outputs of each (concept, condition) once, the first run's where they repeat (the
    same requests give the same cached outputs)."""
    from morph.errors import MorphError

    if len(parts) == 1:
        parts[0]["rows"] = regoal(parts[0]["rows"])
        parts[0]["selected"] = select(parts[0]["rows"])
        return parts[0]
    first = parts[0]["meta"]
    for p in parts[1:]:
        m = p["meta"]
        if (m["split"], m["n_by_task"], m["model"], m["quick"]) != (first["split"], first["n_by_task"], first["model"], first["quick"]):
            raise MorphError("results to merge must come from the same model, split and prompts")
    rows, outputs, seen, seen_o = [], [], set(), {}
    for p in parts:
        for r in p["rows"]:
            if (r["concept"], r["condition"]) not in seen:
                seen.add((r["concept"], r["condition"]))
                rows.append(r)
        for o in p.get("outputs", []):
            k = (o["prompt"], o["concept"], o["condition"])
            if k not in seen_o:
                seen_o[k] = o
                outputs.append(o)
            elif "concept_scores" in o:  # an unsteered output: each run scored it for its own concepts
                seen_o[k]["concept_scores"] = {**o["concept_scores"], **seen_o[k].get("concept_scores", {})}
    order = list(dict.fromkeys(r["concept"] for r in rows))
    rows.sort(key=lambda r: order.index(r["concept"]))  # stable: each concept's rows together
    regoal(rows)
    meta = dict(first)
    meta["scales"] = sorted({s for p in parts for s in p["meta"]["scales"]})
    meta["apply_modes"] = list(dict.fromkeys(a for p in parts for a in p["meta"]["apply_modes"]))
    meta["conditions"] = list(dict.fromkeys(c for p in parts for c in p["meta"]["conditions"]))
    meta["command"] = " + ".join(p["meta"]["command"] for p in parts)
    meta["wall_s"] = round(sum(p["meta"]["wall_s"] for p in parts), 1)
    meta["merged_from"] = len(parts)
    return {"rows": rows, "outputs": outputs, "selected": select(rows), "meta": meta}
