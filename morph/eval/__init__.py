"""`morph eval`: how well a steering vector changes *how* text reads while keeping *what* it says.

prompts  the eval prompts written for morph (rewrite inputs, continue openings; tune/report halves)
judge    an independent concept judge: logistic regression on all-MiniLM-L6-v2 embeddings
scores   per-output scores (concept, relevance, NLL, repetition) and their harmonic mean
plan     conditions (unsteered, prompting, diffmean, SAE, SAE + prompting, apply variants x scales)
run      generation through the product request path, cached; scoring; aggregation; the goal
report   the printed table, EVAL.md with plots, features.json scores
"""
