"""Steering and capture hooks on decoder layers, at torch level (no vLLM import here).

llama.cpp's control vector adds `direction.N` to the output of block N (after its residual
add, `l_out-N`), at every position. Here a forward hook on decoder layer N adds the same
row. A vLLM decoder layer returns `(hidden, residual)` whose sum is the residual stream
after the block, so adding to `hidden` is the same as adding to the sum; a Hugging Face
layer returns the stream itself (a tensor, or a tuple whose first item is it).

Per-request steering in one batch: the batch is a flat run of tokens from several
requests. `SteerTable` holds one row of directions per registered vector (row 0 is all
zeros = unsteered) and a per-token row index `token_rows`, filled before every forward
pass from the batch's token -> request map. The hook gathers `table[token_rows, layer]`
and adds it. Both tensors are persistent and updated in place, so the hooks can be
installed before torch.compile / CUDA-graph capture and stay valid after it.

This module is also what `experiments/gpu_check.py` runs on a plain transformers model, so it
must not import vLLM.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np
import torch


def stream_of(output) -> torch.Tensor:
    """The residual stream after a layer, from whatever the layer returned."""
    if isinstance(output, tuple):
        h = output[0]
        if len(output) > 1 and isinstance(output[1], torch.Tensor) and output[1].shape == h.shape:
            return h + output[1]  # vLLM: (hidden, residual)
        return h
    return output


class SteerTable:
    """Rows of steering directions and the per-token row map, on the model's device."""

    def __init__(self, n_layer: int, hidden: int, n_rows: int, max_tokens: int,
                 dtype: torch.dtype, device: torch.device | str, gate: bool = True):
        self.n_layer = n_layer
        self.hidden = hidden
        self.table = torch.zeros(n_rows, n_layer, hidden, dtype=dtype, device=device)
        self.token_rows = torch.zeros(max_tokens, dtype=torch.long, device=device)
        # Eager only: skip the gather when no token of the batch is steered. Under
        # torch.compile the hook must not branch on Python state, so `gate` is False there.
        self.gate = gate
        self.active = False
        # Eager fast paths: the blocks that any row of this batch steers, and the one row
        # when every token of the batch has the same (then a broadcast add, no gather).
        self.active_layers: frozenset[int] = frozenset()
        self.single_row: int | None = None
        self._row_layers: dict[int, frozenset[int]] = {}
        self._layer_views = [self.table[:, i] for i in range(n_layer)]  # persistent views
        self._rows: OrderedDict[str, int] = OrderedDict()  # key -> row, least recent first
        self._filled = 0  # token_rows[:_filled] may be non-zero
        self.handles: list = []

    # --- vectors ------------------------------------------------------------------------

    def row_for(self, key: str) -> int | None:
        row = self._rows.get(key)
        if row is not None:
            self._rows.move_to_end(key)
        return row

    def register(self, key: str, dense: np.ndarray, in_use: Callable[[], set[int]] = set) -> int:
        """Put a (n_layer, hidden) array in a row (reusing the least recent free row)."""
        row = self.row_for(key)
        if row is not None:
            return row
        if dense.shape != (self.n_layer, self.hidden):
            raise ValueError(f"steering array has shape {dense.shape}, expected {(self.n_layer, self.hidden)}")
        n_rows = self.table.shape[0]
        used = set(self._rows.values())
        free = [r for r in range(1, n_rows) if r not in used]
        if free:
            row = free[0]
        else:
            busy = in_use()
            for k, r in self._rows.items():  # least recent first
                if r not in busy:
                    del self._rows[k]
                    row = r
                    break
            else:
                raise RuntimeError(f"all {n_rows - 1} steering rows are in use")
        arr = np.array(dense, dtype=np.float32)
        self.table[row].copy_(torch.from_numpy(arr).to(self.table.dtype))
        self._row_layers[row] = frozenset(int(i) for i in np.flatnonzero(np.any(arr != 0, axis=1)))
        self._rows[key] = row
        return row

    # --- the token -> row map -----------------------------------------------------------

    def set_token_rows(self, rows: np.ndarray | None) -> None:
        """Rows for the tokens of the next forward pass (None or all zero: unsteered)."""
        n = 0 if rows is None else len(rows)
        if n > self.token_rows.shape[0]:
            raise ValueError(f"{n} tokens exceed the steering map's {self.token_rows.shape[0]}")
        used = set(np.unique(rows).tolist()) - {0} if n else set()
        self.active_layers = frozenset().union(*(self._row_layers.get(r, frozenset()) for r in used))
        self.active = bool(self.active_layers)
        self.single_row = next(iter(used)) if len(used) == 1 and bool((rows != 0).all()) else None
        if self.active:
            self.token_rows[:n].copy_(torch.from_numpy(rows.astype(np.int64)))
            if self._filled > n:
                self.token_rows[n:self._filled].zero_()
            self._filled = n
        elif self._filled:
            self.token_rows[: self._filled].zero_()
            self._filled = 0

    # --- hooks --------------------------------------------------------------------------

    def hook(self, layer: int):
        rows_at_layer, token_rows = self._layer_views[layer], self.token_rows

        def add_steering(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            if self.gate:  # eager: skip what adds nothing; one row for all: broadcast
                if layer not in self.active_layers:
                    return None
                if self.single_row is not None:
                    h2 = h + rows_at_layer[self.single_row]
                    return (h2, *output[1:]) if isinstance(output, tuple) else h2
            if h.dim() == 2:  # vLLM: (tokens, hidden)
                h2 = h + rows_at_layer.index_select(0, token_rows[: h.shape[0]])
            else:
                flat = h.reshape(-1, h.shape[-1])
                h2 = (flat + rows_at_layer.index_select(0, token_rows[: flat.shape[0]])).view_as(h)
            return (h2, *output[1:]) if isinstance(output, tuple) else h2

        return add_steering

    def install(self, layers: Sequence[torch.nn.Module]) -> None:
        """Hook every decoder layer but the first (llama.cpp never steers block 0)."""
        self.remove()
        for i, layer in enumerate(layers):
            if 1 <= i < self.n_layer:
                self.handles.append(layer.register_forward_hook(self.hook(i)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class Capture:
    """Copies the residual stream (or the final hidden state) of chosen tokens to the host,
    and applies per-row edits.

    `spans` lists, for the next forward pass, (tag, start, end, first_position) of the
    tokens to keep; rows are stored per tag and joined in position order by `take`. A tag
    with an entry in `edits` is edited instead: `edits[tag](layer, positions, rows)` returns
    replacement rows (or None), which everything downstream sees. Edits must be row-local:
    a prompt may reach the model in several chunks.
    """

    def __init__(self):
        self.spans: list[tuple[str, int, int, int]] = []
        self.layer_of: dict[str, object] = {}  # tag -> layer index or "final"
        self.rows: dict[str, list[tuple[int, torch.Tensor]]] = {}
        self.edits: dict[str, Callable] = {}
        self.handles: dict[object, object] = {}

    def hook(self, where):
        def keep(module, args, output):
            new_out = None
            for tag, start, end, pos in self.spans:
                if self.layer_of.get(tag) != where:
                    continue
                cur = output if new_out is None else new_out
                if where == "final":  # the final norm: its output (first item) is the hidden state
                    h = cur[0] if isinstance(cur, tuple) else cur
                else:
                    h = stream_of(cur)
                rows = h.reshape(-1, h.shape[-1])[start:end]
                fn = self.edits.get(tag)
                if fn is None:
                    self.rows.setdefault(tag, []).append((pos, rows.detach().float().cpu()))
                    continue
                got = fn(where, np.arange(pos, pos + end - start), rows.detach().float().cpu().numpy())
                if got is None:
                    continue
                delta = torch.as_tensor(np.asarray(got, np.float32), device=rows.device).to(rows.dtype) - rows
                first = (cur[0] if isinstance(cur, tuple) else cur).clone()
                flat = first.view(-1, first.shape[-1])
                flat[start:end] += delta
                new_out = (first, *cur[1:]) if isinstance(cur, tuple) else first
            return new_out

        return keep

    def ensure(self, where, module: torch.nn.Module) -> None:
        if where not in self.handles:
            self.handles[where] = module.register_forward_hook(self.hook(where))

    def take(self, tag: str) -> torch.Tensor | None:
        parts = self.rows.pop(tag, None)
        self.layer_of.pop(tag, None)
        self.edits.pop(tag, None)
        if not parts:
            return None
        parts.sort(key=lambda p: p[0])
        return torch.cat([t for _, t in parts])
