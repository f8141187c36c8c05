"""`morph eval`: its prompts, its judge, its scores, its requests, its goal, and the
shipped features measured against it (real model, real engine, real judge)."""

from __future__ import annotations

import copy
import gzip
import json
import os
import shutil
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from morph import paths, tasks
from morph.eval import plan, prompts, run, scores
from morph.eval.judge import JUDGE_DIR, load_axes

NGRAM = 8  # eval text may not share this many consecutive words with build data


def _grams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    w = scores.words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def _build_texts() -> list[str]:
    """Everything vectors are built from: the contrast sets and the SAE corpus."""
    out = []
    for path in sorted(paths.recipes_dir().glob("*.json")):
        r = json.loads(path.read_text(encoding="utf-8"))
        out += [p[k] for p in r["pairs"] for k in ("positive", "negative")]
    corpus = Path(prompts.DATA_DIR).parent / "corpus" / "prompts.jsonl"
    out += [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(out) > 700
    return out


def test_prompts_halves_are_fixed_balanced_and_large_enough():
    every = prompts.load_prompts()
    assert len({p.id for p in every}) == len(every)
    for task in prompts.TASKS:
        per = {s: Counter(p.genre for p in every if p.task == task and p.split == s) for s in prompts.SPLITS}
        assert per["tune"] == per["report"], task  # balanced by genre
        # >= 48 per task: with 16 report prompts, differences under 0.05 were noise (issue 20)
        assert sum(per["report"].values()) >= 48 and len(per["report"]) >= 8, task
    quick = prompts.load_prompts("report", quick=True)
    assert Counter(p.task for p in quick) == {"rewrite": 4, "continue": 4}
    assert prompts.load_prompts("report", quick=True) == quick  # a fixed subset
    assert not {p.id for p in quick} & {p.id for p in prompts.load_prompts("tune")}


def test_eval_prompts_and_judge_examples_are_kept_apart_from_build_data():
    build = set().union(*(_grams(t) for t in _build_texts()))
    ours = [p.text for p in prompts.load_prompts()]
    ours += [json.loads(line)["text"] for f in sorted(JUDGE_DIR.glob("*.jsonl"))
             for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    shared = [(t, g) for t in ours for g in _grams(t) & build]
    assert not shared, shared[:3]
    # The check itself: a recipe sentence pasted into an eval prompt would be caught.
    assert _grams("Note: " + _build_texts()[0]) & build


def test_judge_examples_are_balanced_with_a_held_out_part():
    for ax in load_axes():
        assert Counter(lab for _, lab in ax.train) == {0: len(ax.train) // 2, 1: len(ax.train) // 2}, ax.name
        assert len(ax.test) >= 16, ax.name


def test_scores():
    assert scores.repetition("the cat sat on the mat") == 0.0
    assert scores.repetition("a b c a b c a b c") == pytest.approx(1 - 3 / 7)
    assert scores.repetition("") == 0.0
    assert scores.hmean(1, 1, 1) == pytest.approx(1.0)
    assert scores.hmean(0.5, 1, 1) == pytest.approx(0.75)
    assert scores.hmean(0, 1, 1) < 1e-5  # any zero sinks it
    assert scores.fluency(2.0, 2.5, 0.0) == 1.0  # better than unsteered is capped at 1
    assert scores.fluency(3.0, 2.0, 0.5) == pytest.approx(np.exp(-1) * 0.5)
    assert scores.fluency(float("nan"), 2.0, 0.0) == 0.0
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert scores.relevance(a, np.array([[1.0, 0.0], [-1.0, 0.0]])).tolist() == [1.0, 0.0]


def _row(shift, moved_toward=3, moved_away=0, rel=0.9, nll=1.1, nll_abs=1.0, rep=0.0):
    return {"concept_shift": shift, "moved_toward": moved_toward, "moved_away": moved_away,
            "relevance_ratio": rel, "nll_ratio": nll, "nll": nll_abs, "repetition": rep}


def test_gate_rules():
    """Issue 10's shipping gate for one vector (it still sets `experimental`)."""
    prompting = _row(0.10)
    assert run.gate(_row(0.12), prompting)["meets_goal"]
    assert run.gate(_row(0.10), prompting)["meets_goal"]  # >= the prompting baseline
    g = run.gate(_row(0.08), prompting)
    assert not g["meets_goal"] and not g["beats_prompting"]
    assert not run.gate(_row(0.2, rel=0.84), prompting)["keeps_relevance"]
    assert not run.gate(_row(0.2, nll=1.21), prompting)["keeps_fluency"]
    # Wrong way: a non-positive mean, or more prompts moved away than toward.
    neg = _row(-0.01)
    assert not run.gate(neg, _row(-0.05))["right_way"]
    assert not run.gate(_row(0.2, moved_toward=2, moved_away=3), prompting)["meets_goal"]
    # Moving nothing is not moving the right way, even where prompting moves nothing either.
    assert not run.gate(_row(0.01, moved_toward=0, moved_away=0), _row(-0.02))["right_way"]
    assert not run.gate(_row(0.03, moved_toward=1, moved_away=1), _row(-0.02))["right_way"]


def test_goal_rules():
    """Issue 20 item 6: shift >= 1.5x the instruction's, relevance >= 0.9x unsteered, never
    the wrong way; fluency against the instruction's output (NLL <= 1.2x, repetition +0.05)."""
    prompting = _row(0.10, nll_abs=1.5, rep=0.02)
    assert run.goal(_row(0.151, nll_abs=1.79, rep=0.069), prompting)["meets_goal"]  # just inside every bound
    assert not run.goal(_row(0.14, nll_abs=1.5), prompting)["beats_prompting"]
    assert not run.goal(_row(0.2, rel=0.89, nll_abs=1.5), prompting)["keeps_relevance"]
    # NLL is held against the instruction's, not unsteered text: x1.6 unsteered passes here...
    assert run.goal(_row(0.2, nll=1.6, nll_abs=1.6), prompting)["keeps_fluency"]
    # ...and x1.21 the instruction's does not, nor repetition 0.06 above it.
    assert not run.goal(_row(0.2, nll_abs=1.5 * 1.21), prompting)["keeps_fluency"]
    assert not run.goal(_row(0.2, nll_abs=1.5, rep=0.081), prompting)["keeps_fluency"]
    assert not run.goal(_row(0.2, moved_toward=2, moved_away=3, nll_abs=1.5), prompting)["right_way"]
    # Where the instruction moves nothing (or away), any real move in the right way beats it.
    assert run.goal(_row(0.06, nll_abs=1.5), _row(-0.05, nll_abs=1.5))["beats_prompting"]
    assert not run.goal(_row(0.2), None)["meets_goal"]  # no instruction row: nothing to compare with


def test_selection_prefers_goal_then_hmean_and_honours_tuning():
    def r(method, x, hm, ok, apply="all"):
        return {"concept": "formal", "kind": method, "method": method, "apply": apply, "scale_x": x,
                "hmean": hm, "gate": {"meets_goal": ok}}
    rows = [{"concept": "formal", "kind": "prompt", "method": None}, r("sae", 1.0, 0.5, False), r("sae", 2.0, 0.4, True),
            r("diffmean", 1.0, 0.6, False), r("diffmean", 0.5, 0.3, True)]
    sel = run.select(rows)["formal"]
    assert sel["methods"]["sae"]["scale_x"] == 1.0 and sel["best"] == "diffmean"  # untuned: x1, higher hmean
    tuned = run.tuned_choice({"rows": rows})
    assert tuned["formal"] == {"sae": {"apply": "all", "scale_x": 2.0, "scale": None}, "diffmean": {"apply": "all", "scale_x": 0.5, "scale": None}}
    sel = run.select(rows, tuned)["formal"]
    assert sel["methods"]["sae"]["scale_x"] == 2.0 and sel["best"] == "sae"  # meets the goal beats hmean
    # The choice is shown beside the vectors, never picked as a bare name's method nor tuned.
    choice = {**r("choose", None, 0.9, True), "scale": None}
    sel = run.select(rows + [choice])["formal"]
    assert sel["methods"]["choose"] is choice and sel["best"] == "diffmean"
    assert "choose" not in run.tuned_choice({"rows": rows + [choice]})["formal"]


def test_requests_are_the_ones_morph_steer_sends():
    from morph.steering.vector import ControlVector

    cv = ControlVector({16: np.ones(576, np.float32)})
    t = plan.Target("formal", sources={"sae": plan.Source("sae", cv, 0.3, "formal@sae")})
    for p in (prompts.load_prompts("report", quick=True)[0], prompts.load_prompts("report", quick=True)[-1]):
        steered = plan.build(p, plan.Condition("sae", "formal", 1.5), t)
        ref = tasks.build_request(p.task, p.text, max_tokens=80, temperature=0.0, steering=cv * 0.45)
        assert steered.messages == ref.messages and steered.prompt == ref.prompt
        assert steered.steering.fingerprint() == ref.steering.fingerprint()
        assert (steered.max_tokens, steered.temperature, steered.repeat_penalty, steered.apply) == (80, 0.0, 1.1, "all")
        prompted = plan.build(p, plan.Condition("prompt", "formal"), t)
        assert prompted.steering is None
        if p.task == "rewrite":  # tasks' own prompted rewrite
            assert prompted.messages == tasks.rewrite_messages(p.text, tasks.STYLE_PHRASES["formal"])
        else:
            assert prompted.prompt == f"(Written {tasks.STYLE_PHRASES['formal']}.)\n\n{p.text}"
        both = plan.build(p, plan.Condition("sae+prompt", "formal", 1.0), t)
        assert both.steering is not None and (both.messages, both.prompt) == (prompted.messages, prompted.prompt)
    assert {p.task for p in prompts.load_prompts("report", quick=True)} == {"rewrite", "continue"}


def test_default_apply_condition_sends_each_tasks_shipped_placement(monkeypatch):
    from morph.steering.vector import ControlVector

    cv = ControlVector({16: np.ones(576, np.float32)})
    t = plan.Target("formal", sources={"sae": plan.Source("sae", cv, 0.3, "formal@sae")})
    monkeypatch.setattr(tasks, "DEFAULT_APPLY", {**tasks.DEFAULT_APPLY, "rewrite": "generated", "continue": "prompt-scaled:0.25"})
    got = {p.task: plan.build(p, plan.Condition("sae", "formal", 1.0, plan.DEFAULT_APPLY), t).apply
           for p in prompts.load_prompts("report", quick=True)}
    assert got == {"rewrite": "generated", "continue": "prompt-scaled:0.25"}


def _sweep_rows(shift, rel, nll):
    """Tune-half rows for one concept, two methods, two apply modes, scales x0.5 and x1:
    shift/rel/nll(apply, scale_x) -> that row's figures (the same on both tasks)."""
    def summary(sh, rr, nr):
        return {"n": 4, "concept_shift": sh, "relevance_ratio": rr, "nll_ratio": nr, "moved_toward": 3 if sh > 0 else 0,
                "moved_away": 0, "hmean": 0.5 + sh - abs(1 - rr) - abs(1 - nr)}
    rows = [{"concept": "formal", "kind": "prompt", "method": None, "apply": None,
             "by_task": {t: summary(0.02, 0.9, 1.1) for t in ("rewrite", "continue")}, **summary(0.02, 0.9, 1.1)}]
    for m in ("sae", "diffmean"):
        for a in ("all", "generated"):
            for x in (0.5, 1.0):
                s = summary(shift(a, x), rel(a, x), nll(a, x))
                rows.append({"concept": "formal", "kind": m, "method": m, "apply": a, "scale_x": x, "scale": 0.2 * x,
                             "by_task": {t: dict(s) for t in ("rewrite", "continue")}, **s})
    prompt_row = rows[0]
    for r in rows[1:]:
        r["gate"] = run.gate(r, prompt_row)
    return rows


def test_apply_table_prefers_the_placement_that_keeps_the_meaning():
    rows = _sweep_rows(shift=lambda a, x: 0.1 * x, rel=lambda a, x: 0.95 - (0.2 * x if a == "all" else 0.05 * x),
                       nll=lambda a, x: 1.0 + (0.3 * x if a == "all" else 0.1 * x))
    t = run.apply_table({"rows": rows})
    assert t["choice"] == {"continue": "generated", "rewrite": "generated"}
    g = t["by_task"]["rewrite"]
    assert (g["generated"]["meets"], g["all"]["meets"]) == (2, 2)  # both meet at x0.5...
    assert g["generated"]["kept_shift"] > g["all"]["kept_shift"]  # ...but only one keeps the meaning at x1
    # The other way round, "all" wins: the table follows the measurements, not a preference.
    rows = _sweep_rows(shift=lambda a, x: 0.1 * x, rel=lambda a, x: 0.95 - (0.05 * x if a == "all" else 0.2 * x),
                       nll=lambda a, x: 1.0 + (0.1 * x if a == "all" else 0.3 * x))
    assert run.apply_table({"rows": rows})["choice"] == {"continue": "all", "rewrite": "all"}


def test_runs_in_parts_merge_into_one_sweep_and_refuse_other_prompts():
    from morph.errors import MorphError

    rows = _sweep_rows(shift=lambda a, x: 0.1 * x, rel=lambda a, x: 0.9, nll=lambda a, x: 1.0)
    meta = {"split": "tune", "n_by_task": {"rewrite": 4}, "model": "m", "quick": False, "scales": [0.5, 1.0],
            "apply_modes": ["all"], "conditions": ["sae"], "command": "morph eval", "wall_s": 1.0}
    for r in rows:
        r["condition"] = r["kind"] if r["method"] is None else f"{r['kind']} x{r['scale_x']:g} {r['apply']}"
    def unsteered(**scores):  # each run scores the unsteered output for its own concepts
        return [{"prompt": "p1", "concept": "", "condition": "unsteered", "text": "t", "concept_scores": scores}]

    a = {"rows": rows[:5], "outputs": unsteered(formal=0.3), "meta": meta}
    b = {"rows": [rows[0]] + rows[5:], "outputs": unsteered(casual=0.6), "meta": {**meta, "apply_modes": ["generated"]}}
    m = run.merge([a, b])
    assert [r["condition"] for r in m["rows"]] == [r["condition"] for r in rows]  # the prompt row once
    assert [o["concept_scores"] for o in m["outputs"]] == [{"formal": 0.3, "casual": 0.6}]  # one output, both scores
    assert m["meta"]["apply_modes"] == ["all", "generated"] and m["meta"]["wall_s"] == 2.0
    with pytest.raises(MorphError, match="same model, split and prompts"):
        run.merge([a, {**b, "meta": {**b["meta"], "split": "report"}}])


def test_a_tuning_run_sets_default_scales_and_never_scores(tmp_path):
    from morph.errors import MorphError
    from morph.eval import report

    rows = _sweep_rows(shift=lambda a, x: 0.1 * x, rel=lambda a, x: 0.95 - 0.05 * x, nll=lambda a, x: 1.0 + 0.1 * x)
    manifest = tmp_path / "features.json"
    entries = [{"name": "formal", "method": m, "default_scale": 0.2, "experimental": True} for m in ("sae", "diffmean")]
    manifest.write_text(json.dumps({"features": entries}))
    meta = {"split": "tune", "date": "2026-11-29"}
    with pytest.raises(MorphError, match="--apply default"):
        report.write_features({"rows": rows, "meta": meta}, manifest)
    for r in rows[1:]:
        r["apply"] = plan.DEFAULT_APPLY if r["apply"] == "generated" else r["apply"]
    assert report.write_features({"rows": rows, "meta": meta}, manifest) == ["formal@sae", "formal@diffmean"]
    got = json.loads(manifest.read_text())["features"]
    # both scales meet the goal; x0.5 has the higher hmean: default_scale = 0.2 * 0.5, from the tune half only
    assert [(e["default_scale"], e["scores"]["tune"]["scale_x"], e["experimental"]) for e in got] == [(0.1, 0.5, True)] * 2
    assert all("eval" not in e["scores"] for e in got)


def test_plan_covers_every_condition_once():
    from morph.steering.vector import ControlVector

    cv = ControlVector({16: np.ones(576, np.float32)})
    t = plan.Target("formal", sources={m: plan.Source(m, cv, 0.3, f"formal@{m}") for m in ("sae", "diffmean")})
    conds = plan.plan([t], scales=(0.5, 1.0), applies=("all", "generated"))
    keys = [c.key for c in conds]
    assert keys[:2] == ["unsteered", "prompt"] and len(set(keys)) == len(keys)
    assert sorted(c.key for c in conds if c.kind == "sae") == [
        "sae x0.5 all", "sae x0.5 generated", "sae x1 all", "sae x1 generated"]
    assert sum(c.kind == "diffmean" for c in conds) == 4
    assert [c.key for c in conds if c.kind == "sae+prompt"] == ["sae+prompt x1 all"]
    assert [c.key for c in plan.plan([t], kinds=("unsteered", "diffmean"), scales=(1.0,))] == ["unsteered", "diffmean x1 all"]


def _cli(*args):
    from morph.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.mark.parametrize("args, msg", [
    (["--scales", "1,x"], "--scales"),
    (["--conditions", "sae,bogus"], "unknown condition 'bogus'"),
    (["--apply", "sideways", "--features", "formal"], "apply mode 'sideways'"),
    (["--features", "nonesuch"], "judge cannot score 'nonesuch'"),
])
def test_bad_options_are_one_error_line(args, msg, data_dir):
    r = _cli("eval", "--quick", "--no-progress", *args)
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("morph: error: ") and msg in lines[0], r.output


# --- the shipping gate on the stored report-half outputs ---------------------------------
# The gate's logic, replayed without the model or the judge: the outputs (texts with their
# judge scores, relevance and NLL) of the report run that decided which features are
# offered are stored beside the vectors. Whatever the gate's rules, they must turn those
# outputs into the shipped features.json, and must refuse an offered feature once its
# outputs lose what made it pass.

SHIPPED_DIR = paths.shipped_vectors_dir() / "smollm2-135m-instruct"


def _stored_report() -> dict:
    return json.loads(gzip.decompress((SHIPPED_DIR / "eval-report.json.gz").read_bytes()))


def _aggregate(stored: dict, outputs: list[dict]) -> list[dict]:
    """run.aggregate over `outputs`, for the targets, conditions and prompts of the stored run
    (each vector source at the default scale its entry ships with)."""
    manifest = json.loads((SHIPPED_DIR / "features.json").read_text(encoding="utf-8"))
    scale = {(e["name"], e["method"]): e["default_scale"] for e in manifest["features"]}
    targets, conds = {}, []
    for r in stored["rows"]:
        t = targets.setdefault(r["concept"], plan.Target(r["concept"]))
        if r["method"] and r["method"] not in t.sources:
            t.sources[r["method"]] = plan.Source(r["method"], None, scale[(r["concept"], r["method"])], r["source"])
        if r["kind"] != "unsteered":
            conds.append(plan.Condition(r["kind"], r["concept"], r["scale_x"] or 0.0, r["apply"] or "all"))
    order = [o["prompt"] for o in outputs if o["condition"] == "unsteered"]
    by_id = {p.id: p for p in prompts.load_prompts(stored["meta"]["split"])}
    return run.aggregate(list(targets.values()), [by_id[i] for i in order], conds, outputs)


def _gate(tmp_path: Path, stored: dict, outputs: list[dict]) -> dict[tuple[str, str], dict]:
    """The rows of `outputs` through `morph eval --from ... --write-features` onto a copy of
    the shipped features.json; its entries by (name, method)."""
    res = tmp_path / "results.json"
    res.write_text(json.dumps({"rows": _aggregate(stored, outputs), "outputs": outputs, "meta": stored["meta"]}))
    man = tmp_path / "features.json"
    shutil.copy(SHIPPED_DIR / "features.json", man)
    r = _cli("eval", "--from", str(res), "--write-features", str(man))
    assert r.exit_code == 0, r.output
    return {(e["name"], e["method"]): e for e in json.loads(man.read_text(encoding="utf-8"))["features"]}


def _shipped_entries() -> dict[tuple[str, str], dict]:
    raw = json.loads((SHIPPED_DIR / "features.json").read_text(encoding="utf-8"))
    return {(e["name"], e["method"]): e for e in raw["features"]}


def test_the_gate_on_the_stored_outputs_gives_the_shipped_features(tmp_path, data_dir):
    stored = _stored_report()
    # The rows are what aggregate() makes of the stored outputs, figure for figure.
    rows = _aggregate(stored, stored["outputs"])
    judged = ("goal", "gate", "nll_vs_prompting")  # follow whatever rules the goal and the gate have now
    assert [{k: v for k, v in r.items() if k not in judged} for r in rows] == \
        [{k: v for k, v in r.items() if k not in judged} for r in stored["rows"]]
    # The gate turns them into the shipped entries: offered or experimental, and the
    # scores each records.
    shipped = _shipped_entries()
    got = _gate(tmp_path, stored, stored["outputs"])
    assert got == shipped
    assert any(not e["experimental"] for e in got.values()) and any(e["experimental"] for e in got.values())


@pytest.mark.parametrize("loss", ["no shift", "half the relevance"])
def test_the_gate_refuses_an_offered_feature_whose_outputs_lose_it(tmp_path, data_dir, loss):
    """Each offered feature's own outputs, spoiled one way at a time: its texts score no
    higher for its concept than the unsteered texts do, or keep half their relevance to
    the input. The gate then keeps it experimental, and only it changes."""
    stored = _stored_report()
    shipped = _shipped_entries()
    offered = [k for k, e in shipped.items() if not e["experimental"]]
    assert offered
    unsteered = {o["prompt"]: o for o in stored["outputs"] if o["condition"] == "unsteered"}
    for name, method in offered:
        ev = shipped[(name, method)]["scores"]["eval"]
        cond = plan.Condition(method, name, ev["scale_x"], ev["apply"]).key
        outputs = copy.deepcopy(stored["outputs"])
        mine = [o for o in outputs if o["concept"] == name and o["condition"] == cond]
        assert len(mine) == stored["meta"]["n_prompts"], (name, method, cond)
        for o in mine:
            if loss == "no shift":
                o["concept_score"] = unsteered[o["prompt"]]["concept_scores"][name]
            else:
                o["relevance"] *= 0.5
        got = _gate(tmp_path, stored, outputs)
        assert got[(name, method)]["experimental"] and not got[(name, method)]["scores"]["eval"]["meets_goal"]
        assert {k: e["experimental"] for k, e in got.items() if k != (name, method)} == \
            {k: e["experimental"] for k, e in shipped.items() if k != (name, method)}


# --- the real judge and the shipped features (issue 10 item 7) ---------------------------

MODEL_ID = "smollm2-135m-instruct"
# On the judge's held-out examples (18 per axis). Per axis the ranking (AUC: the chance a
# pole's example scores above the other pole's), not the accuracy: one example sat 0.001
# from the 0.5 threshold, so another CPU's rounding could move an axis' accuracy by 1/18.
# Measured: AUC 0.94-1.0 per axis, accuracy 0.92 on all 108.
AUC_FLOOR = 0.85
MEAN_ACCURACY_FLOOR = 0.85
# The first report prompts per task: the sample the shipping gate was decided on (EVAL.md,
# `--limit 8`).
SAMPLE_PER_TASK = 8
BOOTSTRAP = 10_000  # resamples of the prompts for a one-sided 95% lower bound


@pytest.fixture(scope="module")
def judge():
    from morph.eval.judge import Embedder, Judge

    return Judge(Embedder(threads=1))


# Held-out accuracy of the judge this one replaced (scikit-learn's LogisticRegression(C=4)
# on sentence-transformers' embeddings; bench/embed_reference.py), as in EVAL.md.
ORIGINAL_ACCURACY = {"formality": 0.944, "imagery": 0.889, "length": 1.0, "poetry": 0.778, "register": 0.889,
                     "sentiment": 1.0}


def test_judge_held_out_accuracy_is_above_the_floor(judge):
    acc = {name: v["heldout_accuracy"] for name, v in judge.heldout().items()}
    assert len(acc) == 6 and np.mean(list(acc.values())) >= MEAN_ACCURACY_FLOOR, acc
    assert all(abs(acc[k] - v) <= 0.03 for k, v in ORIGINAL_ACCURACY.items()), acc
    auc = {}
    for ax in load_axes():
        p = judge.score([t for t, _ in ax.test], ax.poles[0])
        y = np.array([lab for _, lab in ax.test])
        auc[ax.name] = float(np.mean([(a > b) + 0.5 * (a == b) for a in p[y == 1] for b in p[y == 0]]))
    assert all(v >= AUC_FLOOR for v in auc.values()), auc
    # and it reads style, not topic: the same content in either pole's words
    s = judge.score(["Hey, you coming to lunch or what?", "We would be honoured if you could attend the luncheon on Friday."], "formal")
    assert s[1] > 0.5 > s[0]


def test_numpy_logistic_regression_reaches_the_regularised_optimum():
    from morph.eval.judge import fit_logistic

    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 20))
    y = (x @ rng.standard_normal(20) + 0.3 * rng.standard_normal(120) > 0.5).astype(int)
    m = fit_logistic(x, y, c=4.0)
    p = m.proba(x)
    # the gradient of sum(log-loss) + |w|^2 / (2C) vanishes there (intercept not penalised)
    assert np.abs(x.T @ (p - y) + m.w / 4.0).max() < 1e-6 and abs((p - y).sum()) < 1e-6
    assert (m.predict(x) == y).mean() > 0.9
    again = fit_logistic(x, y, c=4.0)
    assert np.array_equal(again.w, m.w) and again.b == m.b  # deterministic
    # separable data: the penalty keeps the weights finite
    sep = fit_logistic(np.array([[-1.0], [1.0]]), np.array([0, 1]), c=4.0)
    assert np.isfinite(sep.w).all() and sep.predict(np.array([[-2.0], [2.0]])).tolist() == [0, 1]


def _offered() -> list[dict]:
    """Shipped entries offered by default: measured, and not experimental."""
    raw = json.loads((paths.shipped_vectors_dir() / MODEL_ID / "features.json").read_text(encoding="utf-8"))
    return [e for e in raw["features"] if "eval" in e.get("scores", {}) and e.get("experimental") is False]


def _same_norm_random(cv, seed: int):
    from morph.steering.vector import ControlVector

    rng = np.random.default_rng(seed)
    dirs = {}
    for il, v in cv.directions.items():
        r = rng.standard_normal(v.shape[0]).astype(np.float32)
        dirs[il] = (r / np.linalg.norm(r) * np.linalg.norm(v)).astype(np.float32)
    return ControlVector(dirs, cv.model_hint, dict(cv.meta))


def _concept_scores(engine, judge, entries, swap_random: bool, cache) -> tuple[np.ndarray, np.ndarray]:
    """Each entry run on the report sample at the condition, placement and scale its
    scores.eval records (the product's requests, as the gate ran them), unsteered too.
    Returns (steered, unsteered) concept scores, (prompts, entries): each output scored by
    the judge for its entry's concept."""
    from morph.steering.catalog import Catalog

    catalog = Catalog(MODEL_ID)
    targets: dict[str, plan.Target] = {}
    conds = [plan.Condition("unsteered")]
    for e in entries:
        f = catalog.get(f"{e['name']}@{e['method']}")
        cv = _same_norm_random(f.load_vector(), zlib.crc32(f.key.encode())) if swap_random else f.load_vector()
        t = targets.setdefault(e["name"], plan.Target(e["name"], f.description))
        t.sources[e["method"]] = plan.Source(e["method"], cv, f.default_scale, f.key)
        ev = e["scores"]["eval"]
        conds.append(plan.Condition(e["method"], e["name"], ev["scale_x"], ev["apply"]))
    sample = prompts.load_prompts("report", limit=SAMPLE_PER_TASK)
    res = run.evaluate(engine, judge, list(targets.values()), sample, conds, cache, progress=False)
    engine.set_steering(None)
    out = {(o["concept"], o["condition"], o["prompt"]): o for o in res["outputs"]}
    keys = [(e["name"], c.key) for e, c in zip(entries, conds[1:])]
    steered = np.array([[out[(n, k, p.id)]["concept_score"] for n, k in keys] for p in sample])
    unsteered = np.array([[out[("", "unsteered", p.id)]["concept_scores"][n] for n, _ in keys] for p in sample])
    return steered, unsteered


def _lower_bound(diffs: np.ndarray) -> float:
    """One-sided 95% bootstrap lower bound of the mean of (prompts, features) paired
    differences, resampling prompts (a prompt's outputs under each feature stay together)."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(diffs), (BOOTSTRAP, len(diffs)))
    return float(np.quantile(diffs[idx].mean(axis=(1, 2)), 0.05))


@pytest.mark.slow
def test_offered_features_move_their_concepts_beyond_random_vectors(engine, judge):
    """On the gate's report sample, the offered features (together, paired by prompt) move
    their concepts past unsteered text and past a random vector of the same norm at the
    same scale, each with a 95% bootstrap lower bound above 0. A margin robust by
    construction: another CPU's kernels can change a few prompts' greedy text (the stored
    report, batched with 2 threads, shares 7 of 16 unsteered texts with a 1-thread run
    here), which moves these means by a fraction of their spread. Measured: shift +0.077
    (bound +0.040), past random +0.107 (bound +0.066). Per feature, 16 prompts cannot
    separate every offered one from noise (plain@diffmean past random: bound -0.005):
    which features are offered is the gate's decision, tested on the stored outputs above.
    MORPH_TEST_SWAP_RANDOM=1 swaps the shipped vectors for the random ones, to see it fail."""
    entries = _offered()
    assert entries, "no shipped feature is offered by default (all experimental?)"
    swap = os.environ.get("MORPH_TEST_SWAP_RANDOM") == "1"
    cache = run.Cache(None)  # in memory: the random pass reuses the unsteered outputs
    steered, unsteered = _concept_scores(engine, judge, entries, swap, cache)
    random, _ = _concept_scores(engine, judge, entries, True, cache)
    shift, past_random = steered - unsteered, steered - random
    assert _lower_bound(shift) > 0, (shift.mean(axis=0), _lower_bound(shift))
    assert _lower_bound(past_random) > 0, (past_random.mean(axis=0), _lower_bound(past_random))


def test_continuation_logprobs_takes_token_ids_and_leaves_the_cache_valid(engine):
    """The NLL score runs in the chat framing, so it passes token ids (special tokens kept)."""
    from morph.engine.base import collect

    p = prompts.load_prompts("report", quick=True)[0]
    req = plan.plain(p)
    ctx = engine.prepare_tokens(req)
    engine.set_steering(None)
    engine.reset_cache()
    first = collect(engine.stream(req))
    a = engine.continuation_logprobs(ctx, first.token_ids)
    b = engine.continuation_logprobs(ctx, engine.tokenize("A different answer.", add_bos=False))
    c = engine.continuation_logprobs(ctx, first.token_ids)
    assert a.shape == (len(first.token_ids),) and np.array_equal(a, c) and b.shape[0] > 0
    # Greedy output is the model's own choice, so it is far likelier than another text.
    assert -a.mean() < -b.mean()
    assert engine.cached_tokens == ctx  # the cache holds exactly the prompt afterwards
    engine.reset_cache()
    assert collect(engine.stream(req)).text == first.text  # a fresh context: what morph steer prints
