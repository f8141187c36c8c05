"""Write one experiments/sae_variants.py variant as a control-vector file in the shipped SAE format.

    python -m experiments.sae_variant_vector critical blend:0.5 0.2 /work/results/sae/critical-blend.gguf

The direction is the variant's unit at the SAE's layer, stretched to the SAE's median
residual norm (as `vectors build` writes SAE features); the metadata is the shipped
`<name>.gguf`'s, with `direction`, `default_scale` and (for latent variants) `latents`
updated, so `morph eval --vector FILE` and the catalog read it as the feature it replaces.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


from morph import models, paths
from morph.sae.io import load_sae, sha256_file
from morph.steering.vector import ControlVector, residual_relative


def main(argv: list[str]) -> int:
    name, spec, scale, out = argv[0], argv[1], float(argv[2]), Path(argv[3])
    from experiments import sae_variants as sv
    from morph.engine.llama import LlamaEngine

    info = models.check(models.resolve(None))
    vec_dir = paths.shipped_vectors_dir() / info.model_id
    sae_path = next(vec_dir.glob("sae-L*.gguf"))
    sae = load_sae(sae_path)
    sae.meta["sha256"] = sha256_file(sae_path)
    layer = int(sae.meta["layer"])
    engine = LlamaEngine(info, n_ctx=512, threads=1)
    try:
        unit, vinfo = sv.directions(engine, sae, layer, vec_dir, name, [spec], 32)[spec]
    finally:
        engine.close()
    cur = ControlVector.load(vec_dir / f"{name}.gguf")
    meta = dict(cur.meta)
    meta.update({"direction": spec, "default_scale": scale})
    if isinstance(vinfo.get("latents"), list):
        meta["latents"], meta["weights"] = vinfo["latents"], [1.0] * len(vinfo["latents"])
    norm = float(meta["residual_norm"])
    cv = ControlVector({layer: residual_relative(np.asarray(unit, np.float32), norm)}, info.hint, meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv.save(out)
    print(f"{out}: {name} {spec} scale {scale}; cos diffmean {vinfo.get('cos_diffmean')}, "
          f"cos current {vinfo.get('cos_current')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
