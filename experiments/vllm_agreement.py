"""Cross-engine agreement of steering: llama.cpp (Q4 GGUF) vs vLLM (the dequantised folder).

For N prompts (the shipped corpus openings, as raw text: the continue framing; a chat
template's special tokens are tokenised differently by llama.cpp's text tokenizer and
Hugging Face's) and each shipped feature at its default scale, the next-token
distribution after the prompt is computed by both engines, unsteered and steered:

- kl_engines_steered: KL(llama steered || vLLM steered): how far the engines disagree;
- kl_steering: KL(llama unsteered || llama steered): how far the feature moves llama.cpp;
- kl_engines_unsteered: KL(llama || vLLM) without steering (the quantisation floor);
- top1_agree: share of prompts whose steered argmax is the same token in both engines;
- top1_changed: share of prompts where steering changed llama.cpp's argmax.

The steering effect must dwarf the engines' disagreement. Prints one JSON object.

    OMP_NUM_THREADS=2 VLLM_CPU_OMP_THREADS_BIND=0-1 flock /tmp/morph-cpu.lock python -m experiments.vllm_agreement
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def log_softmax(x):
    import numpy as np

    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def kl(p_logits, q_logits):
    """Mean over rows of KL(P || Q)."""
    import numpy as np

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    a = ap.parse_args()

    import numpy as np

    from morph import models
    from morph.engine.llama import LlamaEngine
    from morph.engine.vllm import VllmEngine
    from morph.errors import MorphError
    from morph.steering.catalog import Catalog

    try:
        info = models.check(models.resolve(None))
        llama = LlamaEngine(info, n_ctx=1024, threads=a.threads)
        vllm = VllmEngine(info, n_ctx=1024, max_num_seqs=16)
    except MorphError as e:
        sys.exit(f"experiments/vllm_agreement.py: {e}")
    corpus = Path_corpus()
    texts = []
    for ln in corpus.read_text(encoding="utf-8").splitlines()[: a.prompts]:
        texts.append(json.loads(ln)["text"])
    assert all(llama.tokenize(t) == vllm.tokenize(t) for t in texts), "tokenizers differ"

    def llama_logits(cv):
        return np.stack([llama.logits(t, cv) for t in texts])

    base_l = llama_logits(None)
    base_v = vllm.logits_batch(texts)
    out = {"model": info.model_id, "prompts": len(texts),
           "unsteered": {"kl_engines": round(kl(base_l, base_v), 5),
                         "top1_agree": round(float(np.mean(base_l.argmax(1) == base_v.argmax(1))), 4)},
           "features": {}}
    cat = Catalog(info.model_id)
    for f in cat.features:
        cv = f.load_vector() * f.default_scale
        sl = llama_logits(cv)
        sv = vllm.logits_batch(texts, cv)
        out["features"][f.key] = {
            "scale": f.default_scale,
            "kl_engines_steered": round(kl(sl, sv), 5),
            "kl_steering": round(kl(base_l, sl), 5),
            "kl_steering_vllm": round(kl(base_v, sv), 5),
            "top1_agree": round(float(np.mean(sl.argmax(1) == sv.argmax(1))), 4),
            "top1_changed": round(float(np.mean(sl.argmax(1) != base_l.argmax(1))), 4),
        }
    fs = out["features"].values()
    out["summary"] = {
        "features": len(out["features"]),
        "median_kl_engines_steered": round(float(np.median([f["kl_engines_steered"] for f in fs])), 5),
        "median_kl_steering": round(float(np.median([f["kl_steering"] for f in fs])), 5),
        "min_ratio_steering_to_engines": round(min(f["kl_steering"] / max(f["kl_engines_steered"], 1e-9) for f in fs), 2),
        "mean_top1_agree": round(float(np.mean([f["top1_agree"] for f in fs])), 4),
    }
    print(json.dumps(out, indent=2))
    vllm.close()
    llama.close()


def Path_corpus():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "morph" / "data" / "corpus" / "prompts.jsonl"


if __name__ == "__main__":
    main()
