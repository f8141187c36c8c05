"""Fixed inputs for the batched-generation reference (tests/data/generate_reference.json):
the same requests, probe jobs, corpus settings and directions for the old loops that made
the reference and for morph/engine/generate.py that must reproduce it."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np

from morph import paths, tasks
from morph.steering.vector import ControlVector

STRENGTHS = (0.0, 2.0, 6.0)
TEXT = "Hey, can you send me the report by Friday? Thanks!"


def formal(engine) -> ControlVector:
    cv = ControlVector.load(paths.shipped_vectors_dir() / engine.info.model_id / "formal.diffmean.gguf")
    return cv * 0.3


def eval_requests(engine) -> list:
    """Greedy requests as `morph eval` sends them: placements, a stop string, tiny limits."""
    cv = formal(engine)
    rw = tasks.build_request("rewrite", TEXT, temperature=0.0, max_tokens=40)
    cont = tasks.build_request("continue", "The lighthouse keeper climbed the stairs", temperature=0.0,
                               max_tokens=40, stop=["."])
    return [
        rw,
        replace(rw, steering=cv),  # prompt-scaled:0.25, the rewrite default
        replace(rw, steering=cv, apply="all"),
        replace(rw, steering=cv, apply="generated"),
        replace(cont, steering=cv * 2.0),
        replace(rw, steering=cv),  # the same prompt and steering again
        replace(rw, max_tokens=1),
        replace(cont, max_tokens=0),
    ]


def probe_jobs(engine) -> tuple[int, list[tuple[list[int], np.ndarray | None, float]]]:
    """(layer, [(prompt tokens, vector at the layer, prompt factor)]) as the old sae/generate.py took them."""
    layer = 16
    v = formal(engine).directions[layer].astype(np.float32)
    a = engine.tokenize("The weather today is")
    b = engine.tokenize(engine.format_chat(tasks.rewrite_messages(TEXT)), add_bos=False, special=True)
    return layer, [(a, v, 1.0), (b, v, 0.0), (a, None, 1.0), (b, -v, 0.25)]


def corpus_prompts() -> list[dict]:
    from morph.sae.corpus import load_prompts

    return load_prompts()[:6]


def corpus_config(tokens: int = 1500):
    from morph.sae.corpus import CorpusConfig

    return CorpusConfig(tokens=tokens, seed=3, n_seq=3, max_new=40, reframe=0.0)


def corpus_digest(c) -> dict:
    acts = np.ascontiguousarray(c.acts[6], np.float32)
    return {"rows": len(c), "docs": [d["tokens"] for d in c.docs], "stops": c.stats["stops"],
            "acts_sha256": hashlib.sha256(acts.tobytes()).hexdigest(),
            "doc_pos_sha256": hashlib.sha256(c.doc.tobytes() + c.pos.tobytes()).hexdigest()}


def selfexplain_inputs(engine):
    from morph.sae.interpret import make_probe

    cv = formal(engine)
    rnd = np.random.default_rng(5).standard_normal(engine.n_embd).astype(np.float32)
    return np.stack([cv.directions[16], rnd]), make_probe(engine, 16)
