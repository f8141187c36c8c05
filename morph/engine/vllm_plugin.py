"""morph's steering inside vLLM: the worker side of every steered request.

`register()` patches vLLM, idempotently, in the process it runs in: VllmEngine calls it
before it builds its in-process engine, and `vllm serve` calls it through morph's
`vllm.general_plugins` entry point (server/vllm_serve.py, which also accepts the
`"steering"` request field there):

- the model runner: after `load_model` a `SteerTable` (vllm_hooks) is hooked onto every
  decoder layer, before any torch.compile/CUDA-graph capture; before every forward pass
  the batch's token -> request map is turned into the per-token row map;
- the engine core's `Request`: a steered request gets a cache salt derived from its
  vector and where it applies, so the prefix cache never hands it KV computed under other
  steering (and never hands steered KV to an unsteered request).

A request carries its steering in `SamplingParams.extra_args["morph"]` (engine/wire.py).

Tensor parallelism: at a decoder layer's boundary the hidden state and the residual are
whole (RowParallelLinear all-reduces), replicated on every rank, so every rank adds the
same full row and the ranks stay identical. Pipeline parallelism is not supported (a rank
holds only some layers; `_find_layers` refuses).
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from morph.engine.wire import Steer

log = logging.getLogger("morph.vllm")
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
        """-> (row for prompt tokens, row for generated tokens, prompt length, capture tags)."""
        state = runner.requests.get(rid)
        m = Steer.of(getattr(state, "sampling_params", None))
        if m is None:
            return (0, 0, 0, ())
        row_p = row_g = 0
        if m.key:
            # Prompt tokens get prompt_factor x the vector, generated tokens all of it.
            row_g = self._row(runner, m.key, m.vector, 1.0)
            pf = m.prompt_factor
            row_p = row_g if pf == 1.0 else (0 if pf == 0.0 else self._row(runner, m.key, m.vector, pf))
        tags = tuple(self._capture(cap) for cap in m.captures)
        # where "generated" starts: the prompt's end, unless scoring a given continuation
        prompt_len = m.split if m.split is not None else len(state.prompt_token_ids or ())
        return (row_p, row_g, prompt_len, tags)

    def _capture(self, cap: dict) -> str:
        """Hook what a capture entry asks for; returns its tag."""
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
        return tag

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


def _patch_request() -> None:
    from vllm.v1.request import Request

    orig = Request.__dict__["from_engine_core_request"].__func__
    if getattr(orig, "_morph", False):
        return

    def from_engine_core_request(cls, request, block_hasher):
        m = Steer.of(request.sampling_params)
        salt = m.cache_salt() if m is not None else None
        if salt:
            request.cache_salt = f"{request.cache_salt}|{salt}" if request.cache_salt else salt
        return orig(cls, request, block_hasher)

    from_engine_core_request._morph = True
    Request.from_engine_core_request = classmethod(from_engine_core_request)
