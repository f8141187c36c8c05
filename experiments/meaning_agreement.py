"""How the product's meaning check (morph/choose.py) agrees with `morph eval`'s relevance.

    python -m experiments.meaning_agreement [--threads 2]

On the stored report-half rewrites (vectors/smollm2-135m-instruct/eval-report.json.gz: every
condition's output for every rewrite prompt), the meaning check's parts against the input
(token-level F1 over all-MiniLM-L6-v2's token rows, lexical content-word retention) and its
verdict (keeps the meaning or not, the rewrite thresholds) next to the eval's relevance
(cosine of the two sentence embeddings). Prints Pearson and Spearman correlations and the
mean relevance of outputs the check passes and fails. One JSON object.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

from morph import choose, meaning
from morph.engine.embed import Embedder
from morph.eval.prompts import load_prompts

REPORT = Path(__file__).resolve().parents[1] / "vectors" / "smollm2-135m-instruct" / "eval-report.json.gz"


def _spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    outs = [o for o in json.load(gzip.open(REPORT))["outputs"] if o["task"] == "rewrite" and o["text"].strip()]
    src = {p.id: p.text for p in load_prompts()}
    emb = Embedder(threads=a.threads)
    f1, content, keeps = [], [], []
    t = choose.THRESHOLDS["rewrite"]
    for o in outs:
        text = o["text"].strip()
        f = choose.token_f1(emb, src[o["prompt"]], [text])[0]
        r = meaning.retention(src[o["prompt"]], text)
        c = choose.Candidate(choose.Rung("eval", 0.0), text, [], o["finish"], token_f1=f, retention=r)
        f1.append(f)
        content.append(r.content)
        keeps.append(choose.keeps(c, t))
    rel = np.array([o["relevance"] for o in outs])
    f1a, ca, ka = np.array(f1), np.array(content), np.array(keeps)
    print(json.dumps({
        "outputs": len(outs),
        "token_f1_vs_relevance": {"pearson": round(float(np.corrcoef(f1a, rel)[0, 1]), 3),
                                  "spearman": round(_spearman(f1a, rel), 3)},
        "content_retention_vs_relevance": {"pearson": round(float(np.corrcoef(ca, rel)[0, 1]), 3)},
        "keeps_meaning": {"share": round(float(ka.mean()), 3),
                          "relevance_if_kept": round(float(rel[ka].mean()), 3) if ka.any() else None,
                          "relevance_if_not": round(float(rel[~ka].mean()), 3) if (~ka).any() else None},
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
