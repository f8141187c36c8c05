"""Issue 20's ladder study: which rungs and which style read to ship (tune half only).

`generate`: every candidate of a wide ladder (default 0.2/0.3/0.4/0.5, the instruction,
instruction+0.2/+0.3) for each tune-half rewrite and feature, through `morph.choose.run`
itself (its line rule, length cap and meaning check), with each candidate's unsteered
self-read, MiniLM relevance and the Gemma 3 270M judge's concept score; plus the unsteered
and the instruction-only rewrite (what `morph eval` calls prompt). One JSON file.

With `--samples K`: K seeded samples (temperature 0.7, top-p 0.95, seed 1000 x the prompt's
index plus the rung's) of the instruction and of instruction+0.2, as rungs s:<rung>:<k>
(`--rungs ''` generates only these). Tried at stop 28 as a ladder, "sampled" below (the
instruction alone and +0.2/+0.3, greedy, and one sample of each, with the vector alone at
0.3 as a second batch where none keeps the meaning: "sampled>0.3"); not shipped (EVAL.md).

`replay`: the choice replayed offline from those files for ladders (rung subsets), style
scorers (direction read, length, ladder order, the judge itself as an oracle ceiling) and
meaning thresholds; per feature: the shift as a ratio to the instruction's and the
relevance ratio to unsteered, as EVAL.md reports them.

    python -m experiments.ladder_study generate --out tuneA.json --features formal@diffmean,concise@sae
    python -m experiments.ladder_study generate --out s.json --rungs '' --samples 4 --features formal@diffmean
    python -m experiments.ladder_study replay tuneA.json tuneB.json s.json

About 4-5 minutes per feature on 1 thread (52 prompts x 7 rungs).
"""
import argparse
import json
import time
from collections import defaultdict

import numpy as np


def generate(argv):
    from morph import choose, models, tasks
    from morph.choose import Rung
    from morph.engine.base import collect
    from morph.engine.embed import Embedder
    from morph.engine.llama import LlamaEngine
    from morph.eval import plan as planmod, probe, prompts as P
    from morph.steering.catalog import Catalog

    ap = argparse.ArgumentParser(prog="ladder_study generate")
    ap.add_argument("--split", default="tune")
    ap.add_argument("--features", default="formal@diffmean,casual@diffmean,concise@sae,concise@diffmean,simple@sae,simple@diffmean,positive@diffmean,vivid@diffmean")
    ap.add_argument("--rungs", default="0.2,0.3,0.4,0.5,i,i+0.2,i+0.3")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--samples", type=int, default=0,
                    help="K sampled candidates each of the instruction and instruction+0.2 (rungs s:<rung>:<k>), "
                         "besides the greedy rungs (none: --rungs '')")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    def rung(s):
        if s == "i": return Rung("instruction", 0.0, True)
        if s.startswith("i+"): return Rung("instruction+" + s[2:], float(s[2:]), True)
        return Rung(s, float(s))
    rungs = [rung(s) for s in a.rungs.split(",") if s]
    sampled = [Rung(f"s:{b.name}:{k}", b.scale, True) for b in (rung("i"), rung("i+0.2")) for k in range(a.samples)]
    info = models.check(models.resolve(None)); eng = LlamaEngine(info, n_ctx=2048, threads=1)
    cat = Catalog(info.model_id); emb = Embedder(threads=1)
    ps = [p for p in P.load_prompts(a.split, tasks=("rewrite",), limit=a.limit)]
    out = {"prompts": {p.id: p.text for p in ps}, "base": {}, "cands": []}
    t0 = time.time()
    for p in ps:
        eng.reset_cache()
        out["base"].setdefault(p.id, {})["unsteered"] = collect(eng.stream(planmod.build(p, planmod.Condition("unsteered"), None))).text.strip()
    for spec in a.features.split(","):
        f = cat.get(spec, experimental=True)
        feat = choose.Feature(f.key, f.load_vector(), tasks.style_phrase(f.name, f.description))
        for i, p in enumerate(ps):
            eng.reset_cache()
            req = tasks.build_request("rewrite", p.text, style=feat.phrase, **planmod.GEN)
            out["base"][p.id]["prompt:" + f.name] = collect(eng.stream(req)).text.strip()
            cands = choose.run(eng, emb, "rewrite", p.text, [feat], rungs=rungs, **planmod.GEN).candidates if rungs else []
            if sampled:  # Prompt-and-Rerank's sampling: seeded per prompt, one seed per rung (choose.ladder_jobs)
                cands += choose.run(eng, emb, "rewrite", p.text, [feat], rungs=sampled, **{
                    **planmod.GEN, "temperature": a.temperature, "top_p": 0.95, "seed": 1000 * i}).candidates
            for c in cands:
                out["cands"].append({"prompt": p.id, "feature": spec, "concept": f.name, "rung": c.rung.name,
                    "text": c.text, "finish": c.finish, "n": len(c.ids), "read": c.reads[f.key],
                    "token_f1": c.token_f1, "ret": c.retention.as_dict(), "keeps": c.keeps_meaning})
        print(spec, f"{time.time()-t0:.0f}s", flush=True)
    eng.close()
    # judge + relevance
    judge = probe.gemma_judge(emb, threads=1)
    srcE = {pid: v for pid, v in zip(out["prompts"], emb(list(out["prompts"].values())))}
    allc = out["cands"]
    E = emb([c["text"] or " " for c in allc])
    for c, e in zip(allc, E):
        c["rel"] = float(max(0.0, e @ srcE[c["prompt"]])) if c["text"] else 0.0
    concepts = sorted({c["concept"] for c in allc})
    base_rows = [(pid, k, t) for pid, d in out["base"].items() for k, t in d.items()]
    BE = emb([t or " " for _, _, t in base_rows])
    out["base_rel"] = {f"{pid}|{k}": float(max(0.0, e @ srcE[pid])) for (pid, k, _), e in zip(base_rows, BE)}
    out["judge"] = {}
    for con in concepts:
        mine = [c for c in allc if c["concept"] == con]
        sc = judge.score([c["text"] for c in mine], con)
        for c, v in zip(mine, sc): c["judge"] = float(v)
        sc = judge.score([t for _, _, t in base_rows], con)
        out["judge"][con] = {f"{pid}|{k}": float(v) for (pid, k, _), v in zip(base_rows, sc)}
    json.dump(out, open(a.out, "w"))
    print("done", f"{time.time()-t0:.0f}s")


def replay(argv):
    files = argv
    D = {"prompts": {}, "base": defaultdict(dict), "cands": [], "judge": defaultdict(dict), "base_rel": {}}
    for f in files:
        d = json.load(open(f))
        D["prompts"].update(d["prompts"]); D["cands"] += d["cands"]; D["base_rel"].update(d.get("base_rel", {}))
        for k, v in d.get("base", {}).items(): D["base"][k].update(v)  # a --rungs '' file has no base
        for k, v in d.get("judge", {}).items(): D["judge"][k].update(v)
    from morph import choose, meaning

    by = defaultdict(lambda: defaultdict(dict))
    for c in D["cands"]:
        by[c["feature"]][c["prompt"]][c["rung"]] = c
        # the product's own checks and fallback run on it (one feature: its style ranks as its read)
        c["cand"] = choose.Candidate(choose.Rung(c["rung"], 0.0), c["text"], [], c["finish"], style=c["read"],
                                     token_f1=c["token_f1"], retention=meaning.Retention(**c["ret"]))

    def fallback(cs):
        best = choose.closest([c["cand"] for c in cs])
        return next(c for c in cs if c["cand"] is best)

    def sim(spec, rungs, score, keep=lambda c: c["keeps"], second=()):
        con = spec.split("@")[0]
        J = D["judge"][con]
        sh, shp, rel, rel0, relp, tw, aw, ch = [], [], [], [], [], 0, 0, defaultdict(int)
        for pid, rs in by[spec].items():
            cs = [rs[r] for r in rungs if r in rs]
            if len(cs) < len(rungs):  # a ladder these files do not have in full
                continue
            ok = [c for c in cs if keep(c)]
            if not ok and second:  # a second batch, generated only where none kept the meaning
                cs = cs + [rs[r] for r in second if r in rs]
                ok = [c for c in cs if keep(c)]
            pick = max(ok, key=lambda c: score(c, cs)) if ok else fallback(cs)
            ch[pick["rung"] if ok else "fb:" + pick["rung"]] += 1
            s = pick["judge"] - J[f"{pid}|unsteered"]
            sh.append(s); shp.append(J[f"{pid}|prompt:{con}"] - J[f"{pid}|unsteered"])
            rel.append(pick["rel"]); rel0.append(D["base_rel"][f"{pid}|unsteered"]); relp.append(D["base_rel"][f"{pid}|prompt:{con}"])
            tw += s > 0.05; aw += s < -0.05
        if not sh:
            return dict(shift=np.nan, x=np.nan, rel_x=np.nan, p_shift=np.nan, p_rel_x=np.nan, tw=0, aw=0, ch={})
        return dict(shift=np.mean(sh), x=np.mean(sh) / np.mean(shp), rel_x=np.mean(rel) / np.mean(rel0),
                    p_shift=np.mean(shp), p_rel_x=np.mean(relp) / np.mean(rel0), tw=tw, aw=aw, ch=dict(ch))

    read = lambda c, cs: c["read"]
    def zread(c, cs):
        v = np.array([x["read"] for x in cs]); return (c["read"] - v.mean()) / max(v.std(), 1e-9)
    short = lambda c, cs: -c["n"]
    order = lambda c, cs: [x["rung"] for x in cs].index(c["rung"])
    def inst_bonus(b):
        return lambda c, cs: zread(c, cs) + (b if c["rung"].startswith("instruction") else 0.0)
    ORACLE = lambda c, cs: c["judge"]
    SC = {"read": read, "order": order, "short": short, "inst+0.5": inst_bonus(0.5), "inst+1": inst_bonus(1.0), "ORACLE": ORACLE}
    LADDERS = {
        "first": ["0.2", "0.3", "0.4", "instruction", "instruction+0.2"],
        "A": ["0.3", "0.4", "0.5", "instruction", "instruction+0.2"],
        "B": ["0.2", "0.4", "instruction", "instruction+0.2", "instruction+0.3"],
        "shipped": ["0.3", "0.5", "instruction", "instruction+0.2", "instruction+0.3"],
        "D": ["0.2", "0.3", "instruction", "instruction+0.2"],
        "all7": ["0.2", "0.3", "0.4", "0.5", "instruction", "instruction+0.2", "instruction+0.3"],
        # with --samples: the sampled ladder tried at stop 28, without and with a second batch
        "sampled": ["instruction", "instruction+0.2", "instruction+0.3", "s:instruction:0", "s:instruction+0.2:0"],
        "s8": [f"s:{r}:{k}" for r in ("instruction", "instruction+0.2") for k in range(4)],
    }
    SECOND = {"sampled>0.3": ("sampled", ["0.3"])}
    for spec in by:
        print(f"== {spec}  (n={len(by[spec])})")
        for ln, rungs in LADDERS.items():
            for sn, sc in SC.items():
                r = sim(spec, rungs, sc)
                print(f"  {ln:5s} {sn:9s} shift {r['shift']:+.3f} x{r['x']:.2f} rel_x {r['rel_x']:.2f} tw/aw {r['tw']}/{r['aw']}  | instr {r['p_shift']:+.3f} rel_x {r['p_rel_x']:.2f}" + (f"  {r['ch']}" if sn == "read" and ln == "shipped" else ""))

    for spec in by:
        for name, (ln, second) in SECOND.items():
            for sn in ("read", "short", "ORACLE"):
                r = sim(spec, LADDERS[ln], SC[sn], second=second)
                print(f"  {spec} {name} {sn:6s} shift {r['shift']:+.3f} x{r['x']:.2f} rel_x {r['rel_x']:.2f} tw/aw {r['tw']}/{r['aw']}")

    print("\n#### threshold grid (ladders first / shipped / all7), scorer read & short & ORACLE")
    def mk(f1, cont):
        th = choose.Thresholds(token_f1=f1, content=cont)
        return lambda c: bool(c["text"]) and choose.keeps(c["cand"], th)
    for spec in by:
        print("==", spec)
        for ln in ("first", "shipped", "all7"):
            for f1 in (0.65, 0.6, 0.55, 0.5):
                for cont in (0.4, 0.3, 0.2):
                    row = []
                    for sn in ("read", "short", "ORACLE"):
                        r = sim(spec, LADDERS[ln], SC[sn], keep=mk(f1, cont))
                        row.append(f"{sn} x{r['x']:.2f}/{r['rel_x']:.2f}")
                    print(f"  {ln:5s} f1>={f1} cont>={cont}: " + "  ".join(row))


if __name__ == "__main__":
    import sys

    cmd, *argv = sys.argv[1:] or ["--help"]
    {"generate": generate, "replay": replay}.get(cmd, lambda _: print(__doc__))(argv)
