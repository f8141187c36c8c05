"""Markdown table of experiments/sae_variants.py results (one or more JSON files, merged).

    python -m experiments.sae_variants_md /work/results/sae/s2.json /work/results/sae/s3.json > VARIANTS.md

One row per feature x variant x scale (a later file's row replaces an earlier one's):
concept shift (moved toward/away of n prompts), relevance ratio, NLL ratio, hmean, and
the issue 10 item 5 checks against the prompting row of the same run.
"""

from __future__ import annotations

import json
import sys


def _f(x, fmt="{:+.3f}"):
    return "-" if x is None else fmt.format(x)


def table(results: list[dict]) -> str:
    rows: dict[tuple, dict] = {}
    for res in results:
        for r in res["rows"]:
            rows[(r["feature"], r["variant"], r.get("scale"))] = {**r, "_meta": res["meta"]}
    out = ["| feature | variant | scale | concept shift | toward/away | relevance ratio | NLL ratio | hmean | goal (failed checks) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for (feat, var, scale), r in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1] != "prompt", kv[0][1], kv[0][2] or 0)):
        g = r.get("goal") or {}
        failed = ", ".join(k for k, v in g.items() if k != "meets_goal" and not v)
        goal = "-" if not g else ("yes" if g.get("meets_goal") else f"no ({failed})")
        out.append(f"| {feat} | {var} | {_f(scale, '{:g}')} | {_f(r['concept_shift'])} | "
                   f"{r['moved_toward']}/{r['moved_away']} | {_f(r['relevance_ratio'], '{:.2f}')} | "
                   f"{_f(r['nll_ratio'], '{:.2f}')} | {_f(r['hmean'], '{:.3f}')} | {goal} |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    results = [json.load(open(p)) for p in argv]
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
