"""morph's embedder and judge (llama.cpp + numpy) against the originals they replace
(sentence-transformers + scikit-learn): one JSON object on stdout.

Needs a venv with torch, sentence-transformers and scikit-learn besides morph's own
dependencies (morph itself never imports them; this script is the only place they are
used). It measures:

- embeddings: cosine of morph's embedding to sentence-transformers' on 50 fixed sentences
  (eval prompts, judge examples and edge cases: accents, CJK, numbers, a 120-letter word,
  a text past the 256-token limit); token ids identical or not;
- judge: per-axis held-out accuracy of morph's judge and of the original
  (LogisticRegression(C=4) on sentence-transformers' embeddings);
- on the reporting half's stored outputs (vectors/<model>/eval-report.json.gz): Pearson
  correlation of morph's concept scores and relevance with the original judge's
  (recomputed here, and as stored in the file).

`--write-sample FILE` also stores a few sentences with the original's embeddings (the
sample tests/test_embed.py compares against).

    python bench/embed_reference.py --threads 2 --write-sample tests/data/minilm-reference.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EDGE = [
    "The café's naïve owner said: «Ça va?» — and left.",
    "東京は日本の首都です。",
    "Order #4521 ships on 2024-03-15 at 09:30; total $1,299.99 (incl. 7.5% tax).",
    "Don't stop—can't won't shouldn't've!!!",
    "see " + "a" * 120 + " here",
    "word " * 300,
]
SAMPLE = 6  # sentences stored for the test


def sentences() -> list[str]:
    from morph.eval import judge, prompts

    out = [p.text for p in prompts.load_prompts("report")][:20]
    for ax in judge.load_axes():
        out += [t for t, _ in ax.test[:4]]
    return out + EDGE


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model-id", default="smollm2-135m-instruct")
    ap.add_argument("--write-sample", metavar="FILE")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from scipy.stats import pearsonr
    from sentence_transformers import SentenceTransformer
    from sklearn.linear_model import LogisticRegression

    from morph.engine import minilm
    from morph.engine.embed import Embedder
    from morph.eval import judge as judgemod
    from morph.eval.prompts import load_prompts

    torch.set_num_threads(args.threads)
    src, version, _ = minilm.source()
    st = SentenceTransformer(str(src), device="cpu")
    emb = Embedder(threads=args.threads)

    def st_embed(texts):
        return st.encode(list(texts), batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                         show_progress_bar=False).astype(np.float32)

    sents = sentences()
    ref, got = st_embed(sents), emb.embed(sents)
    cos = (ref * got).sum(axis=1)
    same_tokens = sum(emb.tokens(s) == st.tokenizer(s, truncation=True, max_length=minilm.MAX_TOKENS)["input_ids"]
                      for s in sents)
    out = {"model": f"{minilm.DIST} {version}", "gguf": emb.path.name, "threads": args.threads,
           "embeddings": {"n": len(sents), "cosine_min": round(float(cos.min()), 6),
                          "cosine_mean": round(float(cos.mean()), 6),
                          "cosine_below_0.99": int((cos < 0.99).sum()), "same_token_ids": int(same_tokens)}}

    # The judge: morph's (numpy on llama.cpp embeddings) and the original (sklearn on ST's).
    ours = judgemod.Judge(emb)
    orig = {}
    acc = {}
    for ax in judgemod.load_axes():
        x = st_embed([t for t, _ in ax.train])
        clf = LogisticRegression(C=judgemod.C, max_iter=2000).fit(x, [y for _, y in ax.train])
        orig[ax.name] = (clf, ax.poles)
        xt = st_embed([t for t, _ in ax.test])
        acc[ax.name] = {"original": round(float((clf.predict(xt) == [y for _, y in ax.test]).mean()), 4),
                        "morph": ours.heldout()[ax.name]["heldout_accuracy"]}
    out["judge_heldout_accuracy"] = acc

    def orig_score(texts, pole):
        for clf, poles in orig.values():
            if pole in poles:
                p1 = clf.predict_proba(st_embed(texts))[:, list(clf.classes_).index(1)]
                return p1 if pole == poles[0] else 1 - p1
        raise KeyError(pole)

    report = json.loads(gzip.decompress((ROOT / "vectors" / args.model_id / "eval-report.json.gz").read_bytes()))
    outs = report["outputs"]
    # Concept: every output for its own concept; the unsteered ones for every concept.
    pairs = [(o["text"].strip(), o["concept"]) for o in outs if o["concept"]]
    base = [o["text"].strip() for o in outs if o["condition"] == "unsteered"]
    pairs += [(t, c) for c in sorted({c for _, c in pairs}) for t in base]
    stored = [o.get("concept_score") for o in outs if o["concept"]]
    new_c, old_c = [], []
    for c in sorted({c for _, c in pairs}):
        texts = [t for t, cc in pairs if cc == c]
        new_c += list(ours.score(texts, c))
        old_c += list(orig_score(texts, c))
    ptext = {p.id: p.text for p in load_prompts()}
    texts = [o["text"].strip() for o in outs]
    inputs = [ptext[o["prompt"]] for o in outs]
    new_r = np.clip((emb.embed(texts) * emb.embed(inputs)).sum(1), 0, 1)
    old_r = np.clip((st_embed(texts) * st_embed(inputs)).sum(1), 0, 1)
    new_stored = [float(ours.score([o["text"].strip()], o["concept"])[0]) for o in outs if o["concept"]]
    out["report_half"] = {
        "outputs": len(outs), "concept_pairs": len(pairs),
        "concept_pearson": round(float(pearsonr(new_c, old_c)[0]), 6),
        "concept_mean_abs_diff": round(float(np.mean(np.abs(np.array(new_c) - old_c))), 5),
        "concept_pearson_vs_stored": round(float(pearsonr(new_stored, stored)[0]), 6),
        "relevance_pearson": round(float(pearsonr(new_r, old_r)[0]), 6),
        "relevance_mean_abs_diff": round(float(np.mean(np.abs(new_r - old_r))), 5),
        "relevance_pearson_vs_stored": round(float(pearsonr(new_r, [o["relevance"] for o in outs])[0]), 6),
    }
    if args.write_sample:
        pick = [sents[0], sents[20], sents[-6], sents[-5], sents[-2], sents[-1]][:SAMPLE]
        sample = {"model": f"{minilm.DIST} {version}", "reference": f"sentence-transformers {_version('sentence-transformers')}",
                  "sentences": [{"text": s, "embedding": [round(float(v), 6) for v in st_embed([s])[0]]} for s in pick]}
        Path(args.write_sample).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write_sample).write_text(json.dumps(sample) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=1))
    return 0


def _version(dist: str) -> str:
    from importlib import metadata

    return metadata.version(dist)


if __name__ == "__main__":
    sys.exit(main())
