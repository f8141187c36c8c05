"""SAE feature variants against their diffmean twins, judged on the eval prompts (one JSON).

    python -m experiments.sae_variants --features formal,concise --variants current,diffmean,lat:0,sparse:8,proj:16 \
        --scales 0.1,0.2,0.3 --apply generated --split tune --n 10 --out /work/results/sae/x.json

For issue 10 item 4: each variant is a direction at the SAE's layer (experiments/sae_directions.py),
stored like every shipped vector (unit x the layer's median residual norm) and measured
at absolute scales. Per (feature, variant, scale) the same figures as `morph eval`
(morph/eval/run.py's own row and goal code): concept shift from the MiniLM judge, relevance
ratio, NLL ratio, repetition, hmean, and the item 5 goal against the prompting baseline.

This is a screening tool: generation is batched (morph/engine/generate.py, greedy with the
engine's repeat penalty and apply placement), not the product path, so final figures
come from `morph eval --vector`. Variants:

    current         the shipped SAE feature (<name>.gguf)
    diffmean        the shipped diffmean twin (<name>.diffmean.gguf)
    file:PATH       any control vector file (its block-L direction); {name}: the feature's name
    lat:R           the R-th best-separating latent of the pole (0-based)
    id:J[+J2...]    decoder rows of these latents, summed with their mean code differences
    sparse:M        sum of the top-M latents' decoder rows weighted by mean code difference (0: all)
    proj:M          the diffmean direction projected onto the span of the top-M latents' rows
    blend:A         A * current + (1 - A) * diffmean
    blendp:M:A      A * proj:M + (1 - A) * diffmean

Generations are cached (--cache, JSONL) by prompt tokens and vector bytes, so adding a
variant reruns only that variant. Progress on stderr, JSON on stdout (and --out).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


from morph import models, paths
from morph.errors import MorphError
from morph.eval import plan as planmod
from morph.eval import run as runmod
from morph.eval import scores
from morph.eval.plan import Condition, Source, Target
from morph.eval.prompts import load_prompts
from experiments import sae_directions as V
from morph.engine.generate import Job, generate, runner_for
from morph.sae.io import load_sae, sha256_file
from morph.sae.score import Item, logprobs
from morph.steering import diffmean as dm
from morph.steering.vector import ControlVector
from morph.engine.base import apply_factors

MAX_NEW = planmod.GEN["max_tokens"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class GenCache:
    def __init__(self, path: Path | None):
        self.path, self.data = path, {}
        if path and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    r = json.loads(line)
                    self.data[r["k"]] = r["v"]
                except ValueError:
                    pass

    def put(self, k, v):
        self.data[k] = v
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"k": k, "v": v}) + "\n")


def key(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def recipe_for(name: str) -> tuple[dm.Recipe, int]:
    for p in sorted(paths.recipes_dir().glob("*.json")):
        r = dm.load_recipe(p)
        for pole, sign in r.poles:
            if pole["name"] == name:
                return r, sign
    raise MorphError(f"no recipe has a pole {name!r}")


def file_unit(path: Path, layer: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    cv = ControlVector.load(path)
    if layer not in cv.directions:
        raise MorphError(f"{path}: no direction at block {layer}")
    return V.unit(cv.directions[layer])


def directions(engine, sae, layer: int, vec_dir: Path, name: str, specs: list[str], n_rank: int) -> dict:
    """{spec: (unit, info)} for one feature."""
    recipe, sign = recipe_for(name)
    train, _ = dm.split_pairs(recipe)
    ck = Path(os.path.expanduser("~/.cache/morph-sae-poles")) / f"{sae.meta.get('sha256') or key(sae.W_dec[:4].tobytes())}-{recipe.axis}-{n_rank}.npz"
    if ck.is_file():
        z = np.load(ck)
        pl = V.PoleLatents(sign, z[f"order{sign}"], sign * z["effect"], sign * z["mdiff"])
    else:
        pls = V.pole_latents(engine, sae, layer, train[:n_rank])
        ck.parent.mkdir(parents=True, exist_ok=True)
        np.savez(ck, effect=pls[1].effect, mdiff=pls[1].mdiff, **{"order1": pls[1].order, "order-1": pls[-1].order})
        pl = pls[sign]
    cur = file_unit(vec_dir / f"{name}.gguf", layer)
    dmu = file_unit(vec_dir / f"{name}.diffmean.gguf", layer)
    out = {}
    for spec in specs:
        kind, _, arg = spec.partition(":")
        info: dict = {}
        if kind == "current":
            if cur is None:
                continue
            u = cur
        elif kind == "diffmean":
            u = dmu
        elif kind == "file":  # "{name}" in the path stands for the feature's name
            u = file_unit(Path(arg.replace("{name}", name)), layer)
        elif kind == "lat":
            j = int(pl.order[int(arg)])
            u, info = V.latent(sae, j), {"latents": [j]}
        elif kind == "id":
            lat = [int(x) for x in arg.split("+")]
            u, info = V.weighted(sae, lat, [max(1e-6, float(pl.mdiff[j])) for j in lat]), {"latents": lat}
        elif kind == "sparse":
            m = int(arg)
            u = V.sparse_diff(sae, pl, m or None)
            info = {"latents": [int(j) for j in pl.order[:m]] if m else f"all {len(pl.order)}"}
        elif kind == "proj":
            m = int(arg)
            u = V.project(sae, dmu, list(pl.order[:m]))
            info = {"latents": [int(j) for j in pl.order[:m]]}
        elif kind == "blend":
            if cur is None:
                continue
            u = V.blend(cur, dmu, float(arg))
        elif kind == "blendp":
            m, a = arg.split(":")
            u = V.blend(V.project(sae, dmu, list(pl.order[: int(m)])), dmu, float(a))
        else:
            raise MorphError(f"unknown variant {spec!r}")
        if u is None:
            continue
        info["cos_diffmean"] = round(V.cos(u, dmu), 4) if dmu is not None else None
        info["cos_current"] = round(V.cos(u, cur), 4) if cur is not None else None
        out[spec] = (u, info)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", required=True)
    ap.add_argument("--variants", default="current,diffmean")
    ap.add_argument("--scales", default="0.1,0.2,0.3")
    ap.add_argument("--apply", default="generated")
    ap.add_argument("--split", default="tune")
    ap.add_argument("--n", type=int, default=10, help="prompts per task")
    ap.add_argument("--skip", type=int, default=0, help="skip the first N prompts per task")
    ap.add_argument("--sae", default=None, help="SAE gguf [default: the shipped one]")
    ap.add_argument("--vectors", default=None, help="folder with <name>.gguf and <name>.diffmean.gguf")
    ap.add_argument("--n-rank", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (2 stalls on a busy 2-core machine)")
    ap.add_argument("--n-seq", type=int, default=32)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "morph-sae-variants.jsonl"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--texts", default=None, help="also write every output text here (.json.gz)")
    a = ap.parse_args()

    from morph.engine.llama import LlamaEngine
    from morph.eval import judge as judgemod

    t0 = time.perf_counter()
    info = models.check(models.resolve(None))
    vec_dir = Path(a.vectors) if a.vectors else paths.shipped_vectors_dir() / info.model_id
    sae_path = Path(a.sae) if a.sae else next(vec_dir.glob("sae-L*.gguf"))
    sae = load_sae(sae_path)
    sae.meta["sha256"] = sha256_file(sae_path)
    layer = int(sae.meta["layer"])
    rnorm = float(sae.meta.get("residual_norm") or 0) or None
    names = [x for x in a.features.split(",") if x]
    specs = [x for x in a.variants.split(",") if x]
    scales = [float(x) for x in a.scales.split(",")]
    prompt_f, _ = apply_factors(a.apply)
    prompts = load_prompts(a.split)
    by_task: dict[str, list] = {}
    for p in prompts:
        by_task.setdefault(p.task, []).append(p)
    prompts = [p for t in sorted(by_task) for p in by_task[t][a.skip:a.skip + a.n]]
    engine = LlamaEngine(info, n_ctx=2048, threads=a.threads)
    cache = GenCache(Path(a.cache) if a.cache else None)
    try:
        log(f"SAE {sae_path.name} (block {layer}); {len(prompts)} prompts; features {names}")
        dirs = {n: directions(engine, sae, layer, vec_dir, n, specs, a.n_rank) for n in names}
        # residual norm the shipped vectors are stretched to (the diffmean file's own norm if present)
        norms = {}
        for n in names:
            f = vec_dir / f"{n}.diffmean.gguf"
            cv = ControlVector.load(f) if f.is_file() else None
            norms[n] = float(np.linalg.norm(cv.directions[layer])) if cv else rnorm
        plain = {p.id: engine.prepare_tokens(planmod.plain(p)) for p in prompts}
        # jobs: (prompt, concept, condition key, tokens, vector, prompt_factor)
        jobs = [(p, "", "unsteered", plain[p.id], None, 1.0) for p in prompts]
        for n in names:
            t = Target(n)
            for p in prompts:
                req = planmod.build(p, Condition("prompt", n), t)
                jobs.append((p, n, "prompt", engine.prepare_tokens(req), None, 1.0))
            for spec, (u, _) in dirs[n].items():
                for s in scales:
                    vec = (u * np.float32(norms[n] * s)).astype(np.float32)
                    for p in prompts:
                        jobs.append((p, n, f"{spec}@{s:g}", plain[p.id], vec, prompt_f))
        keys = [key(j[3], j[4].tobytes() if j[4] is not None else b"", j[5] if j[4] is not None else 1.0, MAX_NEW,
                    info.fingerprint) for j in jobs]
        todo = sorted({k: i for i, k in enumerate(keys) if k not in cache.data}.values())
        log(f"{len(jobs)} generations, {len(todo)} to run")
        if todo:
            gjobs = [Job(jobs[i][3], None if jobs[i][4] is None else ControlVector({layer: jobs[i][4]}),
                         f"prompt-scaled:{jobs[i][5]}", MAX_NEW, repeat_penalty=1.1) for i in todo]

            def done(j, out):  # cached as each finishes: an interruption keeps them
                cache.put(keys[todo[j]], {"ids": out.ids, "text": out.text})
                log(f"generated {j + 1}/{len(todo)}")

            with runner_for(engine, gjobs, a.n_seq) as runner:
                generate(runner, gjobs, on_done=done)
        gens = [cache.data[k] for k in keys]
        # NLL under the unsteered model in the plain framing
        uniq: dict[tuple, int] = {}
        for (p, *_), g in zip(jobs, gens):
            uniq.setdefault((p.id, tuple(g["ids"])), len(uniq))
        nll_key = {u: key("nll", plain[u[0]], list(u[1]), info.fingerprint) for u in uniq}
        need = [u for u in uniq if u[1] and nll_key[u] not in cache.data]
        log(f"NLL for {len(need)} outputs")
        if need:
            with engine.batch_runner(n_seq=16, n_ctx=4096, n_batch=1024) as runner:
                lps = logprobs(runner, [Item(plain[u[0]] + list(u[1]), len(plain[u[0]])) for u in need], layer)
            for u, lp in zip(need, lps):
                cache.put(nll_key[u], {"nll": float(-np.mean(lp))})
    finally:
        engine.close()
    log("judging")
    judge = judgemod.Judge(judgemod.Embedder(threads=a.threads))
    texts = [g["text"].strip() for g in gens]
    rel = scores.relevance(judge.embed(texts), judge.embed([j[0].text for j in jobs]))
    outputs = []
    for i, (j, g) in enumerate(zip(jobs, gens)):
        u = (j[0].id, tuple(g["ids"]))
        outputs.append({"prompt": j[0].id, "task": j[0].task, "condition": j[2], "concept": j[1], "text": g["text"],
                        "relevance": float(rel[i]) if texts[i] else 0.0,
                        "nll": cache.data[nll_key[u]]["nll"] if u[1] else float("nan"),
                        "repetition": scores.repetition(g["text"])})
    unst = {o["prompt"]: o for o in outputs if o["condition"] == "unsteered"}
    for n in names:
        mine = [o for o in outputs if o["concept"] == n]
        ref = [unst[p.id] for p in prompts]
        pc = judge.score([o["text"].strip() for o in mine + ref], n)
        for o, v in zip(mine, pc[:len(mine)]):
            o["concept_score"] = float(v)
        for o, v in zip(ref, pc[len(mine):]):
            o.setdefault("concept_scores", {})[n] = float(v)
    by_cond: dict[tuple, dict] = {}
    for o in outputs:
        by_cond.setdefault((o["concept"], o["condition"]), {})[o["prompt"]] = o
    base = by_cond[("", "unsteered")]
    rows, best = [], {}
    for n in names:
        t = Target(n)
        prow = runmod._row(t, Condition("prompt", n), prompts, by_cond[(n, "prompt")], base)
        rows.append({"feature": n, "variant": "prompt", **_slim(prow)})
        for spec, (u, vinfo) in dirs[n].items():
            vrows = []
            for s in scales:
                tv = Target(n, sources={"file": Source("file", None, s, spec)})
                r = runmod._row(tv, Condition("file", n, 1.0, a.apply), prompts, by_cond[(n, f"{spec}@{s:g}")], base)
                r["goal"] = runmod.goal(r, prow)
                r = {"feature": n, "variant": spec, "scale": s, **_slim(r), "info": vinfo}
                rows.append(r)
                vrows.append(r)
            b = max(vrows, key=lambda r: (r["goal"]["meets_goal"], r["hmean"] or -1))
            ok = [r for r in vrows if r["relevance_ratio"] >= runmod.GOAL["relevance_ratio_min"]
                  and r["nll_ratio"] <= runmod.GOAL["nll_ratio_max"] and not runmod.wrong_way(r)]
            best[f"{n}|{spec}"] = {"best_scale": b["scale"], "hmean": b["hmean"], "shift": b["concept_shift"],
                                   "rel_x": b["relevance_ratio"], "nll_x": b["nll_ratio"],
                                   "meets_goal": b["goal"]["meets_goal"],
                                   "max_shift_in_budget": max((r["concept_shift"] for r in ok), default=None),
                                   "prompt_shift": prow["concept_shift"], **vinfo}
    res = {"meta": {"features": names, "variants": specs, "scales": scales, "apply": a.apply, "split": a.split,
                    "n_per_task": a.n, "skip": a.skip, "n_prompts": len(prompts), "sae": sae_path.name,
                    "layer": layer, "wall_s": round(time.perf_counter() - t0, 1),
                    "command": " ".join(sys.argv)},
           "best": best, "rows": rows}
    text = json.dumps(res, indent=1)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    if a.texts:
        with gzip.open(a.texts, "wt") as f:
            json.dump(outputs, f)
    print(text)
    for k, b in best.items():
        log(f"{k:28s} x{b['best_scale']:<5g} shift {b['shift']:+.3f} (prompt {b['prompt_shift']:+.3f}) "
            f"rel {b['rel_x']:.2f} nll {b['nll_x']:.2f} hmean {b['hmean']:.3f} goal {b['meets_goal']} "
            f"budget-shift {b['max_shift_in_budget']}")
    return 0


def _slim(r: dict) -> dict:
    keep = ("concept_shift", "moved_toward", "moved_away", "relevance", "relevance_ratio", "nll_ratio",
            "repetition", "fluency", "hmean", "goal")
    out = {k: r[k] for k in keep if k in r}
    out["by_task"] = {t: {k: v[k] for k in ("concept_shift", "relevance_ratio", "nll_ratio", "hmean")}
                      for t, v in r.get("by_task", {}).items()}
    return out


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MorphError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        sys.exit(1)
