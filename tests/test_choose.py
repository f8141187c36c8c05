"""Steer, check, choose (morph/choose.py, morph/meaning.py) on the real model and the real
embedder: the ladder is one batch whose candidates are what each rung gives alone, the
style read is the unsteered model's, the choice is the strongest candidate that keeps the
meaning, and `morph steer` uses it only where the user left the strength to morph."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from morph import choose, meaning, tasks
from morph.engine.embed import Embedder
from morph.engine.llama import LlamaEngine
from morph.steering.catalog import Catalog

TEXT = "hey, can u send me the report by friday? we need the 3 budget numbers before the call with Dana. thx"


@pytest.fixture(scope="module")
def emb(threads):
    e = Embedder(threads=threads)
    yield e
    e.close()


@pytest.fixture(scope="module")
def formal(engine):
    f = Catalog(engine.info.model_id).get("formal")
    return choose.Feature("formal", f.load_vector(), tasks.style_phrase(f.name, f.description))


@pytest.fixture(scope="module")
def choice(engine, emb, formal):
    return choose.run(engine, emb, "rewrite", TEXT, [formal], max_tokens=48, temperature=0.0)


def test_retention_counts_numbers_names_and_content_words():
    src = "Send Dana the 3 budget numbers by Friday, before the call."
    kept = meaning.retention(src, "Kindly send Dana the three... no: the 3 budget figures before the call on Friday.")
    assert kept.numbers == 1.0 and kept.names == 1.0 and 0.5 <= kept.content < 1.0
    lost = meaning.retention(src, "Please send the budget before the call.")
    assert lost.numbers == 0.0 and lost.names == 0.0  # "3" and "dana" are gone
    assert meaning.retention("ok thanks", "Certainly.") == meaning.Retention(1.0, 1.0, 1.0)  # nothing to keep


def test_token_f1_rewards_the_same_meaning(emb):
    same, para, other = choose.token_f1(emb, TEXT, [
        TEXT, "Could you please send me the report by Friday? We need the 3 budget numbers before the call with Dana.",
        "The museum opens at nine and the gift shop sells postcards."])
    assert same == pytest.approx(1.0, abs=1e-5)
    assert para > 0.7 > 0.5 > other
    rows = emb.token_embeddings([TEXT, ""])
    assert rows[0].shape == (len(emb.tokens(TEXT)) - 2, 384) and rows[1].shape == (0, 384)
    assert np.allclose(np.linalg.norm(rows[0], axis=1), 1.0, atol=1e-5)


def test_the_ladder_is_one_batch_of_what_each_rung_gives_alone(engine, emb, choice, formal, greedy_agrees,
                                                               model_info, threads):
    assert [c.rung for c in choice.candidates] == list(choose.RUNGS)
    # Without the repeat penalty, so that a near-tie in log-probs is what decides the token.
    plain = choose.run(engine, emb, "rewrite", TEXT, [formal], max_tokens=48, temperature=0.0, repeat_penalty=1.0)
    by_rung = {c.rung.name: c for c in plain.candidates}
    jobs = dict(choose.ladder_jobs(engine, "rewrite", TEXT, [formal], max_tokens=48, temperature=0.0, repeat_penalty=1.0))
    for rung, job in jobs.items():
        req = tasks.build_request("rewrite", TEXT, max_tokens=48, temperature=0.0, repeat_penalty=1.0,
                                  style=choose.instruction([formal]) if rung.instructed else None,
                                  steering=choose.combined([formal], rung.scale), apply=choose.LADDER_APPLY)
        assert list(engine.prepare_tokens(req)) == job.tokens and job.ends_at is not None
        cand = by_rung[rung.name]
        # A fresh engine: one that reuses an earlier prompt's cells evaluates the rest in
        # other splits, and on this model that moves log-probs by up to ~0.2 (measured).
        fresh = LlamaEngine(model_info, n_ctx=2048, threads=threads)
        try:
            events = list(fresh.stream(req))
            alone, text = [t for e in events for t in e.token_ids], "".join(e.text for e in events)
            if cand.finish == "until":  # the ladder's length cap (choose.rewrite_cap) ended it
                assert len(cand.ids) == choose.rewrite_cap(len(engine.tokenize(TEXT))) + 1
                alone, text = alone[: len(cand.ids)], None
            elif job.ends_at(text) >= 0 and text.strip().startswith(cand.text):  # one line in, one line out
                alone, text = alone[: len(cand.ids)], text[: job.ends_at(text)]
            if text is not None and text.strip() == cand.text:
                continue
            # batched vs alone: other batch shapes, other kernels (equal up to the first near-tie)
            greedy_agrees(fresh, job.tokens, alone, cand.ids, req.steering, req.apply)
        finally:
            fresh.close()
    # the instruction is in the instructed rungs' prompt only, the vector in the steered ones
    plain, instructed = jobs[choose.RUNGS[0]], jobs[choose.Rung("instruction", 0.0, True)]
    assert len(instructed.tokens) > len(plain.tokens) and instructed.steering is None
    assert plain.steering is not None and plain.apply == choose.LADDER_APPLY


def test_a_rewrite_candidate_has_as_many_lines_as_its_input(engine, emb, formal):
    """What a candidate adds after the input's last line (commentary, a reply, a sign-off)
    is cut by the decode loop as the line starts, and generation of that candidate ends."""
    one = choose.lines_end(1)
    assert one("Could you send it?") == -1 and one("Could you send it?\n") == -1
    assert one("Could you send it?\nI hope this message finds you well.") == len("Could you send it?")
    two = choose.lines_end(2)
    letter = "Dear Dana,\n\nThe printer is fixed."
    assert two(letter) == -1 and two(letter + "\n\nBest regards,") == len(letter)
    # On the real model: a one-line message, and candidates that would go on to a second line.
    text = "hey, can u send me the report by friday? thx"
    c = choose.run(engine, emb, "rewrite", text, [formal], max_tokens=48, temperature=0.0)
    assert all("\n" not in x.text for x in c.candidates), [x.text for x in c.candidates]
    from dataclasses import replace

    from morph.engine.generate import generate, runner_for

    went_on = 0
    for _, job in choose.ladder_jobs(engine, "rewrite", text, [formal], max_tokens=48, temperature=0.0):
        # each alone (one batch shape, so the same tokens up to the cut), with the rule and without
        with runner_for(engine, [job]) as runner:
            cut = generate(runner, [job])[0]
        free = replace(job, ends_at=None)
        with runner_for(engine, [free]) as runner:
            whole = generate(runner, [free])[0]
        assert "\n" not in cut.text.strip()
        if "\n" in whole.text.strip():
            went_on += 1
            assert whole.text.startswith(cut.text) and cut.ids == whole.ids[: len(cut.ids)] and len(cut.ids) < len(whole.ids)
            assert cut.finish == "stop"
        else:
            assert cut.ids == whole.ids
    assert went_on, "no candidate went past one line here: this test checks nothing"


def test_a_sampled_ladder_gives_each_rung_its_own_seed(engine, emb, formal):
    """With a temperature and a seed, rungs that share a recipe are different samples (one
    seed would make them the same text), and the same seed gives the same candidates again."""
    same = [choose.Rung(f"instruction:{k}", 0.0, True) for k in range(3)]
    run = lambda: choose.run(engine, emb, "rewrite", TEXT, [formal], rungs=same, max_tokens=32,
                             temperature=0.9, top_p=0.95, seed=11)
    a, b = run(), run()
    assert [c.ids for c in a.candidates] == [c.ids for c in b.candidates]
    assert len({tuple(c.ids) for c in a.candidates}) > 1, [c.text for c in a.candidates]
    seeds = [j.seed for _, j in choose.ladder_jobs(engine, "rewrite", TEXT, [formal], rungs=same,
                                                    temperature=0.9, seed=11)]
    assert seeds == [11, 12, 13]


def test_concise_is_read_by_length_and_the_shorter_kept_candidate_wins(emb, formal):
    src = "The swimming pool will close for cleaning from Monday to Wednesday, and the lessons booked for those days will move to the following week."
    long_ = src
    short = "The pool closes Monday to Wednesday for cleaning; those days' lessons move to the following week."
    concise = choose.Feature("concise@sae", formal.vector, "concisely")
    cands = [choose.Candidate(choose.Rung("0.3", 0.3), long_, [], "stop"),
             choose.Candidate(choose.Rung("instruction", 0.0, True), short, [], "stop")]
    for c in cands:
        c.reads = {concise.key: choose.style_read(concise, None, 0, c, len(src.split()))}
    assert cands[1].reads[concise.key] > cands[0].reads[concise.key]
    choice = choose.pick(emb, src, cands, choose.THRESHOLDS["rewrite"])
    assert all(c.keeps_meaning for c in cands), [c.scores() for c in cands]
    assert choice.chosen is cands[1]


def test_the_style_read_is_the_unsteered_models(engine, formal):
    """The read taken while a steered candidate is generated equals reading its tokens again
    with no vector at all (the vector is added after the block the read is taken at)."""
    from morph.engine.generate import Job, generate, runner_for

    layer, unit = choose.unit_direction(formal)
    rung, job = next((r, j) for r, j in choose.ladder_jobs(engine, "rewrite", TEXT, [formal], max_tokens=32,
                                                            temperature=0.0) if r.name == "0.5")
    reads = choose.Reads([job], [len(job.tokens)])
    with runner_for(engine, [job]) as runner:
        out = generate(runner, [job], on_rows=reads)[0]
    steered = np.concatenate(reads.rows[0][layer])
    steered = steered[: len(out.ids)]  # tokens decoded past a cut have rows too; the read leaves them out
    assert len(steered) > 0
    reread = Job(tokens=job.tokens + out.ids, max_tokens=1, capture=[layer])  # no vector
    rows = {}

    def keep(i, positions, acts):
        for p, r in zip(positions, acts[layer]):
            rows[int(p)] = r.copy()

    with runner_for(engine, [reread]) as runner:
        generate(runner, [reread], on_rows=keep)
    clean = np.array([rows[len(job.tokens) + k] for k in range(len(steered))])
    # the same rows up to batch-split noise, far from the steered rows themselves
    assert np.abs(steered - clean).max() < 0.05 * np.abs(clean).max()
    assert np.abs((steered + job.steering.directions[layer]) - clean).max() > 0.5 * np.linalg.norm(job.steering.directions[layer]) / np.sqrt(len(unit))
    assert abs(reads.mean(0, layer, unit, n=len(out.ids)) - float((clean @ unit).mean())) < 0.05 * max(1.0, abs(float((clean @ unit).mean())))


def test_the_choice_is_the_strongest_that_keeps_the_meaning(choice):
    kept = [c for c in choice.candidates if c.keeps_meaning]
    assert kept, [c.scores() for c in choice.candidates]
    assert choice.chosen in kept and choice.chosen.style == max(c.style for c in kept)
    assert meaning.retention(TEXT, choice.text).numbers == 1.0  # the 3 survives
    d = choice.as_dict()
    assert d["rung"] == choice.chosen.rung.name and len(d["candidates"]) == len(choose.RUNGS)
    assert "chose" in choose.describe(choice)


def test_none_keeping_the_meaning_gives_the_closest(emb):
    cands = [choose.Candidate(choose.Rung("a", 0.1), "Bananas are yellow.", [1], "stop", reads={"f": 2.0}),
             choose.Candidate(choose.Rung("b", 0.2), "Send me the report by Friday.", [1], "stop", reads={"f": 1.0})]
    c = choose.pick(emb, TEXT, cands, choose.Thresholds(token_f1=0.99))
    assert not any(x.keeps_meaning for x in cands) and c.chosen.rung.name == "b"


def morph(*args, input=b"", data_dir=None):
    env = dict(os.environ, MORPH_DATA_DIR=str(data_dir))
    return subprocess.run([sys.executable, "-m", "morph", *args], input=input, capture_output=True, timeout=300,
                          env=env)


def test_steer_chooses_says_which_and_logs_it(data_dir):
    r = morph("steer", "-f", "formal", "-v", "--temperature", "0", "--max-tokens", "48",
              input=TEXT.encode(), data_dir=data_dir)
    assert r.returncode == 0, r.stderr.decode()
    err = r.stderr.decode()
    line = next(ln for ln in err.splitlines() if ln.startswith("morph: chose "))
    row = json.loads(morph("log", "--json", "-n", "1", data_dir=data_dir).stdout)[0]
    chosen = json.loads(row["chosen"]) if isinstance(row["chosen"], str) else row["chosen"]
    assert chosen["rung"] in {r.name for r in choose.RUNGS} and f"'{chosen['rung']}'" in line
    assert row["output"].strip() == r.stdout.decode().strip()


def test_an_explicit_scale_or_no_choose_is_one_plain_rewrite(data_dir):
    """`formal=0.2` is honoured exactly (no ladder), and `--no-choose` rewrites once at the
    default strength: each prints what the same single request prints."""
    base = ["steer", "--temperature", "0", "--max-tokens", "32", "-v", "--no-log"]
    explicit = morph(*base, "-f", "formal=0.2", input=TEXT.encode(), data_dir=data_dir)
    assert explicit.returncode == 0 and "chose" not in explicit.stderr.decode()
    same = morph(*base, "-f", "formal=0.2", "--no-choose", input=TEXT.encode(), data_dir=data_dir)
    assert same.stdout == explicit.stdout
    plain = morph(*base, "-f", "formal", "--no-choose", input=TEXT.encode(), data_dir=data_dir)
    assert plain.returncode == 0 and "chose" not in plain.stderr.decode()
    chosen = morph(*base, "-f", "formal", input=TEXT.encode(), data_dir=data_dir)
    assert "chose" in chosen.stderr.decode()
