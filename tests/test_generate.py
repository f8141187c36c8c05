"""The batched generation loop (morph/engine/generate.py) on the real model.

Its callers used to have loops of their own (eval/batched.py, sae/generate.py, the
corpus generator, the self-explanation sweep). tests/data/generate_reference.json holds
what those old loops produced on the inputs of tests/generate_inputs.py (made by
tests/data/make_generate_reference.py, in git at commit 398ec71, before they were replaced);
the new loop must reproduce them bit for bit. The reference also holds `engine.stream`'s
outputs for the eval requests: where this llama.cpp build gives other ones, the
reference does not apply here and those tests skip.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import generate_inputs as gi
import pytest

from morph.engine.base import collect
from morph.engine.generate import Job, generate, generate_requests, runner_for
from morph.steering.vector import ControlVector

REFERENCE = Path(__file__).parent / "data" / "generate_reference.json"


@pytest.fixture(scope="module")
def stream_outputs(engine):
    out = []
    for r in gi.eval_requests(engine):
        engine.reset_cache()
        c = collect(engine.stream(r))
        out.append({"ids": c.token_ids, "text": c.text, "finish": c.finish_reason})
    return out


@pytest.fixture(scope="module")
def ref(engine, stream_outputs):
    r = json.loads(REFERENCE.read_text())
    if r["model"] != engine.info.model_id or r["stream"] != stream_outputs:
        pytest.skip("the reference was made on a llama.cpp build that generates other tokens")
    return r


def test_requests_give_the_engines_tokens(engine, stream_outputs):
    """Greedy requests (every placement, a stop string, 1 and 0 tokens, one repeated)
    batched give what `engine.stream` gives from a fresh cache, ids included."""
    outs = generate_requests(engine, gi.eval_requests(engine), n_seq=4)
    assert [{"ids": o.ids, "text": o.text, "finish": o.finish} for o in outs] == stream_outputs


def test_eval_outputs_equal_the_old_loop(engine, ref):
    """Text and finish as the old eval loop; ids too, except where a stop string cut the
    text: the old loop kept the id of the token that completed the stop string, the new one
    keeps the ids of the kept text, as `engine.stream` does (request 4, stop ".")."""
    outs = generate_requests(engine, gi.eval_requests(engine), n_seq=4)
    for i, (o, old) in enumerate(zip(outs, ref["eval"])):
        assert (o.text, o.finish) == (old["text"], old["finish"]), i
        assert o.ids == (old["ids"][:-1] if i == 4 else old["ids"]), i
    assert ref["eval"][4]["ids"][:-1] == ref["stream"][4]["ids"]


def test_probe_jobs_equal_the_old_greedy_loop(engine, ref):
    """Jobs as sae/generate.greedy took them: a vector at one block, a prompt factor each,
    greedy with the repeat penalty, 24 tokens, three sequences at a time."""
    layer, specs = gi.probe_jobs(engine)
    jobs = [Job(t, None if v is None else ControlVector({layer: v}), f"prompt-scaled:{f}", max_tokens=24,
                repeat_penalty=1.1) for t, v, f in specs]
    with engine.batch_runner(n_seq=3, n_ctx=3 * 512, n_batch=512, unified=False) as runner:
        assert [o.ids for o in generate(runner, jobs)] == ref["probe"]


def test_corpus_generation_equals_the_old_loop(engine, ref):
    """Sampled, seeded continuations (one generator per job), captured as they are
    generated, cut at a row budget: the same documents, rows and activations."""
    from morph.sae import corpus

    docs, counts = corpus.generate_text(engine, gi.corpus_config(), gi.corpus_prompts())
    assert {"docs": docs, "counts": counts} == ref["corpus_text"]
    c = corpus.build_corpus(engine, [6], gi.corpus_config(tokens=900), gi.corpus_prompts())
    assert gi.corpus_digest(c) == ref["corpus"]


def test_self_explanation_equals_the_old_loop(engine, ref):
    """Placeholder rows replaced at the insert block, the read block captured, the first
    token's entropy, then the explanation at the chosen strength: the same numbers."""
    from morph.sae import interpret

    dirs, probe = gi.selfexplain_inputs(engine)
    sweeps = interpret.self_explain(engine, dirs, probe, gi.STRENGTHS)
    got = [s.to_json() | {"ss_exact": [float(x).hex() for x in s.self_similarity],
                          "h_exact": [float(x).hex() for x in s.entropy]} for s in sweeps]
    assert got == ref["selfexplain"]


class _Counting:
    """A runner that counts prompt evaluations and KV copies."""

    def __init__(self, runner):
        self.r, self.prefills, self.copies = runner, 0, 0

    def __getattr__(self, name):
        return getattr(self.r, name)

    def decode(self, tokens, pos, seq, *a, **kw):
        self.prefills += pos[0] == 0
        return self.r.decode(tokens, pos, seq, *a, **kw)

    def copy(self, *a):
        self.copies += 1
        return self.r.copy(*a)


def test_jobs_with_one_prompt_share_its_prefill(engine):
    """A ladder: six jobs on one prompt and one on another. The prompt is evaluated once
    per (tokens, prompt steering), an unsteered prompt whatever the placement; the copies
    generate exactly what separate prefills do."""
    req = gi.eval_requests(engine)[1]  # rewrite, steered, prompt-scaled:0.25
    base = Job.from_request(engine, req)
    other = Job.from_request(engine, gi.eval_requests(engine)[4])
    ladder = [base, replace(base, steering=base.steering * 2.0), replace(base, steering=base.steering * 2.0),
              replace(base, steering=None, apply="generated"), replace(base, steering=base.steering, apply="generated"),
              replace(base, steering=None), other]
    with runner_for(engine, ladder) as runner:
        shared = _Counting(runner)
        outs = generate(shared, ladder)
        assert (shared.prefills, shared.copies) == (4, 3)  # base, x2, the unsteered prompt (3 jobs), other
        alone = [generate(runner, [j])[0] for j in ladder]
    assert [o.ids for o in outs] == [o.ids for o in alone]
    assert outs[1].ids == outs[2].ids and outs[0].ids != outs[1].ids


def test_prompts_that_start_alike_share_their_common_cells(engine):
    """share_prefix (the ladder's): two rewrites of one text, the instruction in one of them,
    the second copies the cells they share and evaluates only the rest; here both still
    generate what `engine.stream` gives from a fresh cache (not guaranteed in general: rounding)."""
    from morph import tasks

    reqs = [tasks.build_request("rewrite", "hey, can u send me the report by friday? thx", temperature=0.0,
                                max_tokens=24),
            tasks.build_request("rewrite", "hey, can u send me the report by friday? thx", temperature=0.0,
                                max_tokens=24, style="in a formal, polite, professional register")]
    jobs = [Job.from_request(engine, r) for r in reqs]
    common = next(i for i, (a, b) in enumerate(zip(jobs[0].tokens, jobs[1].tokens)) if a != b)
    assert common >= 16
    evaluated = []
    with runner_for(engine, jobs) as runner:
        counting = _Counting(runner)
        real_decode = counting.decode

        def decode(tokens, pos, seq, *a, **kw):
            evaluated.append(len(tokens))
            return real_decode(tokens, pos, seq, *a, **kw)

        counting.decode = decode
        outs = generate(counting, jobs, share_prefix=True)
    assert (counting.prefills, counting.copies) == (1, 1)
    assert evaluated[:2] == [len(jobs[0].tokens), len(jobs[1].tokens) - common]  # both begin before any step
    for r, o in zip(reqs, outs):
        engine.reset_cache()
        c = collect(engine.stream(r))
        assert (o.ids, o.text) == (c.token_ids, c.text)


def test_sampled_jobs_follow_their_seed(engine):
    """Sampled jobs: the same seed gives the same text whatever else is in the batch."""
    base = replace(Job.from_request(engine, gi.eval_requests(engine)[0]), temperature=0.9, top_p=0.95, top_k=40)
    jobs = [replace(base, seed=s) for s in (1, 2, 3, 1)]
    with runner_for(engine, jobs) as runner:
        outs = generate(runner, jobs)
        again = generate(runner, [jobs[3], jobs[1]])
    assert outs[0].ids == outs[3].ids == again[0].ids and outs[1].ids == again[1].ids
    assert len({tuple(o.ids) for o in outs}) >= 2


def test_cancel_and_streamed_tokens(engine):
    """on_token streams each job's tokens as they are sampled; setting `cancel` ends every
    running job at the next step with finish "cancelled"."""
    job = replace(Job.from_request(engine, gi.eval_requests(engine)[2]), max_tokens=40)
    jobs = [job, replace(job, steering=None)]
    cancel, seen = threading.Event(), {0: [], 1: []}

    def on_token(i, tok):
        seen[i].append(tok)
        if len(seen[0]) == 5:
            cancel.set()

    with runner_for(engine, jobs) as runner:
        outs = generate(runner, jobs, cancel=cancel, on_token=on_token)
        full = generate(runner, jobs)
    assert [o.finish for o in outs] == ["cancelled", "cancelled"]
    assert outs[0].ids == seen[0] == full[0].ids[:5] and outs[1].ids == seen[1] == full[1].ids[:5]
    assert min(len(o.ids) for o in full) > 5  # both would have gone on
