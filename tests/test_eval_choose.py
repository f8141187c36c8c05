"""`morph eval`'s choose condition is what users get from `morph steer -f NAME` at its
default strength: on a rewrite, morph.choose.run's choice (the product's own call) and
the text `morph steer` prints; on a continuation, the bare name's single default request.
Real model, real engine, real embedder; two report rewrites and one continuation."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from morph import choose, tasks
from morph.engine.base import collect
from morph.eval import plan, prompts, run
from morph.eval.judge import Judge, load_axes
from morph.steering.catalog import Catalog


@pytest.fixture(scope="module")
def emb(threads):
    from morph.engine.embed import Embedder

    e = Embedder(threads=threads)
    yield e
    e.close()


def _sample() -> list[prompts.EvalPrompt]:
    quick = prompts.load_prompts("report", quick=True)
    return [p for p in quick if p.task == "rewrite"][:2] + [p for p in quick if p.task == "continue"][:1]


def _targets(engine, names):
    known = [pole for ax in load_axes() for pole in ax.poles]
    return plan.targets_from_catalog(Catalog(engine.info.model_id), names, known, n_embd=engine.info.n_embd,
                                     n_layer=engine.info.n_layer)


def test_the_ladder_features_are_the_ones_a_bare_name_gets(engine):
    """An offered name gets its offered method (formal: not the experimental SAE); a name
    with every method experimental gets what --experimental resolves it to."""
    cat = Catalog(engine.info.model_id)
    formal, concise = _targets(engine, ["formal", "concise"])
    assert [f.key for f in formal.ladder] == [cat.get("formal").key] and not cat.get("formal").experimental
    assert [f.key for f in concise.ladder] == [cat.get("concise", experimental=True).key]
    assert formal.bare.label == cat.get("formal").key and formal.bare.default_scale == cat.get("formal").default_scale


@pytest.fixture(scope="module")
def measured(engine, emb):
    """run.evaluate with unsteered, prompting and choose for formal on the sample, every
    morph.choose.run call recorded."""
    calls, real = [], choose.run

    def spy(*args, **kw):
        calls.append((args, kw, real(*args, **kw)))
        return calls[-1][2]

    mp = pytest.MonkeyPatch()
    mp.setattr(choose, "run", spy)
    try:
        (t,) = _targets(engine, ["formal"])
        conds = plan.plan([t], kinds=("unsteered", "prompt", "choose"))
        res = run.evaluate(engine, Judge(emb), [t], _sample(), conds, run.Cache(None), progress=False, embedder=emb)
    finally:
        mp.undo()
    engine.set_steering(None)
    return t, res, calls


def test_a_rewrites_choice_is_choose_run_itself(measured, engine, emb):
    t, res, calls = measured
    rewrites = [p for p in _sample() if p.task == "rewrite"]
    outs = {(o["condition"], o["prompt"]): o for o in res["outputs"]}
    # one product call per rewrite, with the rewrite framing, the text and the bare name's features
    assert [(a[2], a[3]) for a, _, _ in calls] == [("rewrite", p.text) for p in rewrites]
    for (args, kw, choice), p in zip(calls, rewrites):
        assert args[0] is engine and args[1] is emb and args[4] == t.ladder and kw == plan.GEN
        o = outs[("choose", p.id)]
        assert o["text"] == choice.text and o["chosen"] == choice.as_dict()
    # the row says how strongly it steered each input: the rungs chosen
    row = next(r for r in res["rows"] if r["condition"] == "choose")
    assert row["rungs"] == dict(Counter(c.chosen.rung.name for _, _, c in calls))
    assert row["source"] == t.bare.label and row["goal"] is not None and row["nll_vs_prompting"] > 0
    # the same call again gives the same choice (the eval's text is reproducible)
    again = choose.run(engine, emb, "rewrite", rewrites[0].text, t.ladder, **plan.GEN)
    assert again.text == outs[("choose", rewrites[0].id)]["text"]


def test_a_continuations_choose_is_the_single_default_request(measured, engine):
    """No ladder outside rewrites in the product: `-f formal` there is one request at the
    feature's default scale and the task's shipped placement."""
    t, res, _ = measured
    p = next(p for p in _sample() if p.task == "continue")
    f = Catalog(engine.info.model_id).get("formal")
    req = tasks.build_request("continue", p.text, steering=f.load_vector() * f.default_scale, **plan.GEN)
    assert req.apply == tasks.DEFAULT_APPLY["continue"]
    engine.reset_cache()
    want = collect(engine.stream(req)).text
    engine.set_steering(None)
    got = next(o for o in res["outputs"] if o["condition"] == "choose" and o["prompt"] == p.id)
    assert got["text"] == want and "chosen" not in got
    plain = next(o for o in res["outputs"] if o["condition"] == "unsteered" and o["prompt"] == p.id)
    assert plain["text"] != want  # the vector is on


def test_the_eval_text_is_what_morph_steer_prints(measured, tmp_path):
    """The first rewrite through `morph steer -f formal` (a fresh process, shipped defaults,
    one thread): its stdout is the choose condition's text."""
    _, res, _ = measured
    p = next(p for p in _sample() if p.task == "rewrite")
    data = tmp_path / "data"
    data.mkdir()
    (data / "config.toml").write_text("threads = 1\nadaptive_threads = false\n")
    r = subprocess.run([sys.executable, "-m", "morph", "steer", "-f", "formal", "--temperature", "0",
                        "--max-tokens", str(plan.GEN["max_tokens"]), "--no-log"], input=p.text.encode(),
                       capture_output=True, timeout=300, env=dict(os.environ, MORPH_DATA_DIR=str(data)))
    assert r.returncode == 0, r.stderr.decode()
    got = next(o for o in res["outputs"] if o["condition"] == "choose" and o["prompt"] == p.id)
    assert r.stdout.decode().strip() == got["text"].strip()


# --- the judge the report uses: a model the product's checks never use -------------------

@pytest.fixture(scope="module")
def gemma(emb, threads):
    from morph.eval import probe

    j = probe.gemma_judge(emb, threads=threads)
    yield j
    j.features.close()


def test_the_gemma_judge_reads_style_on_its_held_out_examples(gemma):
    """Gemma 3 270M's block-6 features: measured 1.0 held-out accuracy on five axes, 0.944
    on poetry (MiniLM's judge: 0.92 mean)."""
    acc = {name: v["heldout_accuracy"] for name, v in gemma.heldout().items()}
    assert len(acc) == 6 and min(acc.values()) >= 0.88 and sum(acc.values()) / 6 >= 0.95, acc
    s = gemma.score(["Hey, you coming to lunch or what?",
                     "We would be honoured if you could attend the luncheon on Friday."], "formal")
    assert s[1] > 0.5 > s[0]
    assert gemma.embed is not gemma.features  # relevance stays MiniLM's


def test_eval_cli_choose_with_the_gemma_judge(data_dir, tmp_path):
    """`--task rewrite --judge gemma`: only rewrites, the choose row with its rungs, concept
    scores from Gemma's judge, relevance from MiniLM and (relevance_probe) from Gemma."""
    import json

    from click.testing import CliRunner

    from morph.cli import cli

    out = tmp_path / "res.json"
    r = CliRunner().invoke(cli, ["eval", "--split", "report", "--task", "rewrite", "--features", "formal",
                                 "--conditions", "unsteered,prompt,choose", "--limit", "1", "--judge", "gemma",
                                 "--threads", "1", "--no-cache", "--no-progress", "--out", str(out)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["meta"]["n_by_task"] == {"rewrite": 1} and res["meta"]["judge"]["embedder"].startswith("gemma-3-270m")
    row = next(x for x in res["rows"] if x["condition"] == "choose")
    assert sum(row["rungs"].values()) == 1 and 0 <= row["relevance_probe"] <= 1 and "goal" in row
    assert all("relevance_probe" in o for o in res["outputs"])
    assert "per input" in r.output  # the selected table says how the strength was set
    bad = CliRunner().invoke(cli, ["eval", "--task", "rewrite,poems", "--quick"])
    assert bad.exit_code == 1 and "unknown task 'poems'" in bad.output
