"""Write tests/data/generate_reference.json: outputs of the four hand-written batched loops
(eval/batched.generate, sae/generate.greedy, sae/corpus._Generation, sae/interpret's
sweep and explain) on fixed inputs, before they were replaced by morph/engine/generate.py.
Also `engine.stream`'s outputs for the eval requests, which tell a test whether its
llama.cpp build computes what this one did.

    PYTHONPATH=. python tests/data/make_generate_reference.py   # at the commit that adds it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from morph import models
from morph.engine.base import collect
from morph.engine.llama import LlamaEngine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the shared inputs
import generate_inputs as gi  # noqa: E402  (a one-off script, deleted with the old loops)

OUT = Path(__file__).with_name("generate_reference.json")


def main() -> None:
    from morph.eval import batched
    from morph.sae import corpus, interpret
    from morph.sae.generate import GenJob, greedy

    info = models.check(models.resolve(None))
    eng = LlamaEngine(info, n_ctx=2048, threads=1)
    ref: dict = {"model": info.model_id}
    reqs = gi.eval_requests(eng)
    ref["eval"] = [{"ids": o["ids"], "text": o["text"], "finish": o["finish"]}
                   for o in batched.generate(eng, reqs, n_seq=4)]
    stream = []
    for r in reqs:
        eng.reset_cache()
        c = collect(eng.stream(r))
        stream.append({"ids": c.token_ids, "text": c.text, "finish": c.finish_reason})
    ref["stream"] = stream

    layer, jobs = gi.probe_jobs(eng)
    with eng.batch_runner(n_seq=3, n_ctx=3 * 512, n_batch=512, unified=False) as runner:
        ref["probe"] = greedy(runner, [GenJob(t, v, f) for t, v, f in jobs], layer, eng.is_eog, max_new=24)

    cfg = gi.corpus_config()
    docs, counts = corpus.generate_text(eng, cfg, gi.corpus_prompts())
    ref["corpus_text"] = {"docs": docs, "counts": counts}
    c = corpus.build_corpus(eng, [6], gi.corpus_config(tokens=900), gi.corpus_prompts())
    ref["corpus"] = gi.corpus_digest(c)

    dirs, probe = gi.selfexplain_inputs(eng)
    sweeps = interpret.self_explain(eng, dirs, probe, gi.STRENGTHS)
    ref["selfexplain"] = [s.to_json() | {"ss_exact": [float(x).hex() for x in s.self_similarity],
                                          "h_exact": [float(x).hex() for x in s.entropy]} for s in sweeps]
    eng.close()
    OUT.write_text(json.dumps(ref, indent=1) + "\n")
    print(OUT, OUT.stat().st_size)


if __name__ == "__main__":
    main()
