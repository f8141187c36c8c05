"""GPU check of morph's steering hook module (morph/engine/vllm_hooks.py) at torch level.

Runs the hooks on a plain transformers model (no vLLM needed): the model's converted
folder (`morph models convert`, or --model DIR), on CPU and, when there is one, on CUDA.
Checks, per device:
  - a zero vector leaves the logits bit for bit unchanged;
  - per-token rows: a batch whose first sequence is steered and second is not gives the
    same logits as each alone;
and across devices: the logits shift that the feature causes on CUDA equals the CPU's
within tolerance (float32; also bfloat16 with a looser one).
Prints one JSON object; exit 1 when a check fails. Under 5 minutes on a CUDA machine.

    python -m experiments.gpu_check [--model DIR] [--feature formal]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF name/path (converted once) or a Hugging Face folder")
    ap.add_argument("--feature", default="formal")
    a = ap.parse_args()
    t_start = time.perf_counter()

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from morph import convert, runtime
    from morph.engine.vllm_hooks import SteerTable
    from morph.engine.wire import dense
    from morph.errors import MorphError
    from morph.steering.catalog import Catalog

    try:
        info = runtime.model_info(a.model, gpu=True)
        folder = convert.ensure_converted(info)
        feat = Catalog(info.model_id).get(a.feature, experimental=True)
    except MorphError as e:
        sys.exit(f"experiments/gpu_check.py: {e}")
    cv = feat.load_vector() * feat.default_scale
    vec = dense(cv.directions, info.n_layer, info.n_embd)
    tok = AutoTokenizer.from_pretrained(str(folder))
    texts = ["The old lighthouse keeper climbed the stairs and", "hey, can u send me the report by friday? thx"]
    ids = [tok(t).input_ids for t in texts]
    n = min(len(i) for i in ids)
    batch = torch.tensor([i[:n] for i in ids])  # same length: no padding to reason about

    def run(device: str, dtype) -> dict:
        model = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=dtype).to(device).eval()
        layers = model.model.layers
        table = SteerTable(info.n_layer, info.n_embd, n_rows=3, max_tokens=batch.numel(), dtype=dtype, device=device)
        table.register("zero", np.zeros_like(vec))
        table.register("feat", vec)
        table.install(layers)
        x = batch.to(device)

        def logits(rows):
            table.set_token_rows(None if rows is None else np.asarray(rows, np.int64))
            with torch.inference_mode():
                return model(x).logits.float().cpu().numpy()

        per = n
        plain = logits(None)
        zero = logits([1] * (2 * per))
        steered = logits([2] * (2 * per))
        mixed = logits([2] * per + [0] * per)
        table.remove()
        return {"plain": plain, "zero": zero, "steered": steered, "mixed": mixed}

    def device_checks(r, tol) -> dict:
        return {
            "zero_vector_identical": bool(np.array_equal(r["plain"], r["zero"])),
            "mixed_batch_matches_alone": bool(np.allclose(r["mixed"][0], r["steered"][0], atol=tol)
                                              and np.allclose(r["mixed"][1], r["plain"][1], atol=tol)),
            "feature_moves_logits": float(np.abs(r["steered"] - r["plain"]).max()),
        }

    out = {"model": info.model_id, "folder": str(folder), "feature": feat.key, "tokens": int(batch.numel())}
    cpu = run("cpu", torch.float32)
    out["cpu"] = device_checks(cpu, 1e-4)
    ok = out["cpu"]["zero_vector_identical"] and out["cpu"]["mixed_batch_matches_alone"] and out["cpu"]["feature_moves_logits"] > 0.1
    if not torch.cuda.is_available():
        out["cuda"] = "SKIPPED: no CUDA device here (torch.cuda.is_available() is False); CPU checks only"
    else:
        out["cuda_device"] = torch.cuda.get_device_name(0)
        shift_cpu = cpu["steered"] - cpu["plain"]
        for name, dtype, tol in (("cuda_fp32", torch.float32, 2e-2), ("cuda_bf16", torch.bfloat16, 0.5)):
            r = run("cuda", dtype)
            shift = r["steered"] - r["plain"]
            chk = device_checks(r, 1e-3 if dtype == torch.float32 else 0.25)
            chk["max_abs_shift_diff_vs_cpu"] = float(np.abs(shift - shift_cpu).max())
            chk["shift_corr_vs_cpu"] = float(np.corrcoef(shift.ravel(), shift_cpu.ravel())[0, 1])
            chk["top1_steered_agree_vs_cpu"] = float(np.mean(r["steered"].argmax(-1) == cpu["steered"].argmax(-1)))
            chk["ok"] = bool(chk["zero_vector_identical"] and chk["mixed_batch_matches_alone"]
                             and chk["max_abs_shift_diff_vs_cpu"] < tol and chk["shift_corr_vs_cpu"] > 0.99)
            out[name] = chk
            ok = ok and chk["ok"]
    out["ok"] = bool(ok)
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(out, indent=2))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
