"""morph's steering inside vLLM: the worker side, and the `vllm.general_plugins` entry point.

`register()` is what vLLM calls in each of its processes when morph is installed (entry
point `vllm.general_plugins: morph = morph.engine.vllm_plugin:register`); VllmEngine calls
it too before it builds its in-process engine. It patches, idempotently:

- the model runner: after `load_model` a `SteerTable` (vllm_hooks) is hooked onto every
  decoder layer, before any torch.compile/CUDA-graph capture; before every forward pass
  the batch's token -> request map is turned into the per-token row map;
- the engine core's `Request`: a steered request gets a cache salt derived from its
  vector and where it applies, so the prefix cache never hands it KV computed under other
  steering (and never hands steered KV to an unsteered request);
- the OpenAI server's request models: a `"steering"` field in the body (the openai
  client's `extra_body`), the same extension as `morph serve`, becomes the request's
  steering.

A request carries its steering in `SamplingParams.extra_args["morph"]`:
`{"key": str, "vector": bytes (float32, n_layer x hidden, row N = block N), "apply": str,
"prompt_factor": float (share of the vector on prompt tokens: "all" 1, "generated" 0),
"capture": {"tag": str, "layer": int | "final"}}` (all optional).

Tensor parallelism: at a decoder layer's boundary the hidden state and the residual are
whole (RowParallelLinear all-reduces), replicated on every rank, so every rank adds the
same full row and the ranks stay identical. Pipeline parallelism is not supported (a rank
holds only some layers; `_find_layers` refuses).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Any

import numpy as np

log = logging.getLogger("morph.vllm")
EXTRA_KEY = "morph"
# Edit callbacks by id, for activation edits (self-explanation, SAE scoring). A request names
# one; the worker calls it in its forward pass, so this works only with the worker in this
# process (VLLM_ENABLE_V1_MULTIPROCESSING=0 and one GPU), which is how VllmEngine runs.
EDITS: dict[str, object] = {}
_lock = threading.Lock()
_registered = False


def register() -> None:
    """vLLM general-plugin entry point (safe to call many times, in any process)."""
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
    _patch_runner()
    _patch_request()
    try:
        _patch_openai()
    except ImportError:  # a build without the OpenAI server
        pass


# --- the worker -----------------------------------------------------------------------


class WorkerState:
    """Per model runner: the steering table, capture, and each live request's resolution."""

    def __init__(self, runner):
        import torch

        from morph.engine.vllm_hooks import Capture, SteerTable

        model = runner.get_model()
        mc = runner.model_config
        self.n_layer = int(mc.hf_text_config.num_hidden_layers)
        self.hidden = int(mc.get_hidden_size())
        self.layers = _find_layers(model, self.n_layer)
        self.inner = _inner_model(model, self.layers)
        self.model = model
        compiled = not mc.enforce_eager
        sched = runner.scheduler_config
        max_tokens = max(int(getattr(runner, "max_num_tokens", 0) or 0), int(sched.max_num_batched_tokens)) + 64
        self.table = SteerTable(self.n_layer, self.hidden, int(sched.max_num_seqs) + 1, max_tokens,
                                dtype=mc.dtype if isinstance(mc.dtype, torch.dtype) else torch.float32,
                                device=runner.device, gate=not compiled)
        self.table.install(self.layers)
        self.compiled = compiled
        self.capture = Capture()
        self.specs: dict[str, tuple] = {}  # req_id -> (prompt row, generated row, prompt_len, capture tag)
        self.mixed_batches = 0  # forward passes whose tokens carried two or more vectors

    def _in_use(self, runner) -> set[int]:
        return {r for rid, s in self.specs.items() if rid in runner.requests for r in s[:2] if r}

    def _row(self, runner, key: str, raw, factor: float) -> int:
        k = key if factor == 1.0 else f"{key}@{factor!r}"
        row = self.table.row_for(k)
        if row is None:
            if raw is None:
                raise RuntimeError(f"morph steering {key} arrived without its vector")
            arr = np.frombuffer(bytes(raw), dtype=np.float32).reshape(self.n_layer, self.hidden)
            row = self.table.register(k, arr * np.float32(factor), lambda: self._in_use(runner))
        return row

    def _resolve(self, runner, rid: str) -> tuple:
        """-> (row for prompt tokens, row for generated tokens, prompt length, capture tag)."""
        state = runner.requests.get(rid)
        sp = getattr(state, "sampling_params", None)
        m = (sp.extra_args or {}).get(EXTRA_KEY) if sp is not None else None
        if not m:
            return (0, 0, 0, ())
        row_p = row_g = 0
        key = m.get("key")
        if key:
            # Where the vector applies: prompt tokens get prompt_factor x the vector
            # ("all" 1, "generated" 0, "prompt-scaled:F" F), generated tokens all of it.
            pf = float(m.get("prompt_factor", 1.0))
            row_g = self._row(runner, key, m.get("vector"), 1.0)
            row_p = row_g if pf == 1.0 else (0 if pf == 0.0 else self._row(runner, key, m.get("vector"), pf))
        tags = []
        caps = list(m.get("captures") or ())
        if m.get("capture"):
            caps.append(m["capture"])
        for cap in caps:
            if self.compiled:
                raise RuntimeError("activation capture needs an eager engine (enforce_eager=True)")
            tag = str(cap["tag"])
            where = cap["layer"]
            if where == "final":
                # Not the inner model itself: vLLM's compile decorator calls its forward
                # directly, so module hooks on it never run. Its final norm is a plain module.
                self.capture.ensure("final", getattr(self.inner, "norm", None) or self.inner)
            else:
                where = int(where)
                self.capture.ensure(where, self.layers[where])
            self.capture.layer_of[tag] = where
            if cap.get("edit"):
                fn = EDITS.get(cap["edit"])
                if fn is None:
                    raise RuntimeError("activation edits need the in-process engine (one GPU, no worker processes)")
                self.capture.edits[tag] = fn
            tags.append(tag)
        # "split": where "generated" starts when scoring a given continuation (default: the prompt's end)
        prompt_len = int(m.get("split", len(state.prompt_token_ids or ())))
        return (row_p, row_g, prompt_len, tuple(tags))

    def before_forward(self, runner) -> None:
        ib = runner.input_batch
        n = ib.num_reqs
        if n == 0:
            self.table.set_token_rows(None)
            self.capture.spans = []
            return
        qsl = runner.query_start_loc.np
        total = int(qsl[n])
        rows = None
        spans = []
        for i, rid in enumerate(ib.req_ids[:n]):
            spec = self.specs.get(rid)
            if spec is None:
                spec = self.specs[rid] = self._resolve(runner, rid)
            row_p, row_g, prompt_len, tags = spec
            if not row_g and not tags:
                continue
            s, e = int(qsl[i]), int(qsl[i + 1])
            p0 = int(ib.num_computed_tokens_cpu[i])
            if row_g:
                if rows is None:
                    rows = np.zeros(total, np.int64)
                # Tokens at positions >= prompt_len (the first sampled token onwards) are
                # generated ones; the first is sampled from the prompt's last logits.
                split = min(e, max(s, s + prompt_len - p0))
                rows[s:split] = row_p
                rows[split:e] = row_g
            for tag in tags:
                spans.append((tag, s, e, p0))
        if rows is not None and len(set(np.unique(rows).tolist()) - {0}) > 1:
            self.mixed_batches += 1
        self.table.set_token_rows(rows)
        self.capture.spans = spans
        if len(self.specs) > 2 * len(runner.requests) + 16:
            self.specs = {k: v for k, v in self.specs.items() if k in runner.requests}


def _find_layers(model, n_layer: int):
    import torch

    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.split(".")[-1] == "layers" and len(mod) == n_layer:
            best = mod
            break
    if best is None:
        raise RuntimeError(f"morph steering: no ModuleList 'layers' of {n_layer} decoder layers in {type(model).__name__}")
    if any(type(m).__name__ == "PPMissingLayer" for m in best):
        raise RuntimeError("morph steering does not support pipeline parallelism (use tensor parallelism)")
    return best


def _inner_model(model, layers):
    """The module that owns `layers` (its output is the final normed hidden state)."""
    for mod in model.modules():
        if getattr(mod, "layers", None) is layers:
            return mod
    return model


def _patch_runner() -> None:
    classes = []
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    classes.append(GPUModelRunner)
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        classes.append(CPUModelRunner)
    except ImportError:
        pass
    for cls in classes:
        if "load_model" in cls.__dict__ and not getattr(cls.load_model, "_morph", False):
            cls.load_model = _wrap_load(cls.load_model)
        if "_model_forward" in cls.__dict__ and not getattr(cls._model_forward, "_morph", False):
            cls._model_forward = _wrap_forward(cls._model_forward)


def _wrap_load(orig):
    def load_model(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        try:
            self._morph = WorkerState(self)
        except RuntimeError as e:  # an architecture we cannot steer: serve it unsteered
            log.warning("%s", e)
            self._morph = None
        return out

    load_model._morph = True
    return load_model


def _wrap_forward(orig):
    def _model_forward(self, *args, **kwargs):
        st = getattr(self, "_morph", None)
        if st is not None:
            st.before_forward(self)
        return orig(self, *args, **kwargs)

    _model_forward._morph = True
    return _model_forward


# RPCs (LLMEngine.collective_rpc with these functions; `worker` is vLLM's worker) -------


def rpc_info(worker) -> dict:
    st = getattr(worker.model_runner, "_morph", None)
    if st is None:
        return {"hooked": False}
    return {"hooked": True, "n_layer": st.n_layer, "hidden": st.hidden, "compiled": st.compiled,
            "hooks": len(st.table.handles), "rows": int(st.table.table.shape[0]),
            "mixed_batches": st.mixed_batches}


def rpc_set_hooks(worker, on: bool) -> int:
    """Install or remove the steering hooks (eager engines; bench/vllm.py's "no hooks")."""
    st = worker.model_runner._morph
    if on:
        st.table.install(st.layers)
    else:
        st.table.remove()
    return len(st.table.handles)


def rpc_take(worker, tag: str, logits_rows=None):
    """Captured rows for `tag` (and forget them); with `logits_rows` ((start, end) or a list
    of row indices; negative counts from the end), the logits of those rows of the final
    hidden state instead."""
    import torch

    st = worker.model_runner._morph
    h = st.capture.take(tag)
    if h is None:
        return None
    if logits_rows is None:
        return h.numpy()
    if isinstance(logits_rows, tuple):
        h = h[logits_rows[0]:logits_rows[1]]
    else:
        idx = [int(i) for i in logits_rows]
        if any(not -len(h) <= i < len(h) for i in idx):
            return None  # those rows came from the prefix cache
        h = h[torch.as_tensor(idx, dtype=torch.long)]
    p = next(st.model.parameters())
    with torch.inference_mode():
        logits = st.model.compute_logits(h.to(device=p.device, dtype=p.dtype))
    return None if logits is None else logits.float().cpu().numpy()


def rpc_drop_captures(worker) -> None:
    st = worker.model_runner._morph
    st.capture.rows.clear()
    st.capture.layer_of.clear()
    st.capture.edits.clear()


# --- the engine core: prefix-cache isolation ---------------------------------------------


def steering_salt(sp) -> str | None:
    """Cache salt of a request: its vector and placement; "salt" keeps edited KV private."""
    m = (getattr(sp, "extra_args", None) or {}).get(EXTRA_KEY) if sp is not None else None
    if not m or not (m.get("key") or m.get("salt")):
        return None
    return f"morph:{m.get('key')}:{m.get('prompt_factor', m.get('apply', 'all'))}:{m.get('salt', '')}"


def _patch_request() -> None:
    from vllm.v1.request import Request

    orig = Request.__dict__["from_engine_core_request"].__func__
    if getattr(orig, "_morph", False):
        return

    def from_engine_core_request(cls, request, block_hasher):
        salt = steering_salt(request.sampling_params)
        if salt:
            request.cache_salt = f"{request.cache_salt}|{salt}" if request.cache_salt else salt
        return orig(cls, request, block_hasher)

    from_engine_core_request._morph = True
    Request.from_engine_core_request = classmethod(from_engine_core_request)


# --- the OpenAI server: the "steering" request field -------------------------------------

_served: dict[str, Any] = {}


def _patch_openai() -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    orig_cmc = EngineArgs.create_model_config
    if not getattr(orig_cmc, "_morph", False):
        def create_model_config(self, *a, **kw):
            mc = orig_cmc(self, *a, **kw)
            _served["model"] = mc.model
            return mc

        create_model_config._morph = True
        EngineArgs.create_model_config = create_model_config

    for cls in (ChatCompletionRequest, CompletionRequest):
        orig = cls.to_sampling_params
        if getattr(orig, "_morph", False):
            continue
        cls.to_sampling_params = _wrap_to_sampling_params(orig)


def _wrap_to_sampling_params(orig):
    def to_sampling_params(self, *args, **kwargs):
        sp = orig(self, *args, **kwargs)
        body = (self.model_extra or {}).get("steering")
        if body is not None:
            extra = dict(sp.extra_args or {})
            extra[EXTRA_KEY] = api_steering(body)
            sp.extra_args = extra
        return sp

    to_sampling_params._morph = True
    return to_sampling_params


_catalogs: dict[str, tuple] = {}


def api_steering(body) -> dict | None:
    """The request extension `{"features": {name: scale}, "apply": ...}` -> extra_args entry.

    The field is read by morph serve's own parser (one shape for both servers: list or map
    of features, `experimental`, vector files refused over HTTP). Bad input raises
    ValueError, which vLLM's server answers with a 400 error object.
    """
    from morph.engine.vllm import prompt_factor
    from morph.errors import MorphError
    from morph.server.errors import APIError  # the plugin is a front end, like morph serve
    from morph.server.params import parse_steering

    try:
        spec = parse_steering(body)
    except APIError as e:
        raise ValueError(str(e)) from None
    apply = spec.apply or "all"
    try:
        pf = prompt_factor(apply)
    except MorphError as e:
        raise ValueError(f"steering.apply: {e}") from None
    if spec.mode != "residual":
        raise ValueError("this server steers the residual stream only (steering.mode 'logits' is morph serve's)")
    try:
        n_layer, hidden, vector = _resolve_features(spec.features, spec.experimental)
    except MorphError as e:
        raise ValueError(str(e)) from None
    if vector is None:
        return {"apply": apply}
    arr = _dense(vector, n_layer, hidden)
    return {"key": vector_key(arr), "vector": arr.tobytes(), "apply": apply, "prompt_factor": pf}


def _resolve_features(feats: dict, experimental: bool = False):
    from pathlib import Path

    from morph.convert import hf_info
    from morph.errors import MorphError
    from morph.steering.catalog import Catalog

    model = _served.get("model")
    if not model or not Path(model).is_dir():
        raise MorphError("steering needs the served model to be a local folder (e.g. one from `morph models convert`)")
    if model not in _catalogs:
        info = hf_info(Path(model))
        _catalogs[model] = (info, Catalog(info.model_id))
    info, catalog = _catalogs[model]
    requests = dict(feats)
    if not requests:
        return info.n_layer, info.n_embd, None
    from morph.steering import profile

    steering = profile.resolve(catalog, info, requests, experimental=experimental)
    return info.n_layer, info.n_embd, steering.vector


def _dense(cv, n_layer: int, hidden: int) -> np.ndarray:
    from morph.engine.vllm_hooks import dense

    return dense(cv.directions, n_layer, hidden)


def vector_key(arr: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(arr, np.float32).tobytes(), digest_size=12).hexdigest()
