"""A TopK sparse autoencoder on residual-stream activations, trained in numpy on CPU.

    x' = x * scale                               (scale: mean ||x'|| = sqrt(n_embd))
    z  = TopK_k(relu((x' - b_dec) @ W_enc + b_enc))
    x^ = z @ W_dec + b_dec                       (rows of W_dec kept at unit norm)

Loss: ||x^ - x'||^2 plus AuxK (Gao et al. 2024): the k_aux largest pre-activations of
*dead* latents (no activation in the last `dead_tokens` tokens) reconstruct the main
residual, which gives dead latents a gradient and brings them back. Adam, float32,
mini-batches; decoder gradients lose their radial part and rows are renormalised after
every step. Held-out rows (whole documents) give the reported FVU.

Cost per step is a few dense products of (batch x n_embd x width): the sparse scatter of
gradients was 5x slower in numpy than letting BLAS multiply the mostly-zero code matrix.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from morph.errors import MorphError


@dataclass
class SAEConfig:
    width: int = 4096
    k: int = 32
    epochs: float = 2.0
    batch: int = 1024
    lr: float = 4e-3
    warmup: int = 50  # steps
    decay_from: float = 0.7  # linear decay to 0 over the last 30% of steps
    aux_k: int = 256
    aux_coef: float = 1 / 32
    dead_tokens: int = 20_000  # no activation for this many tokens = dead
    holdout_every: int = 20  # every 20th document is held out
    seed: int = 0


@dataclass
class SAE:
    W_enc: np.ndarray  # (n_embd, width)
    b_enc: np.ndarray  # (width,)
    W_dec: np.ndarray  # (width, n_embd), unit rows
    b_dec: np.ndarray  # (n_embd,)
    k: int
    scale: float  # input multiplier applied before encoding
    meta: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        return self.W_dec.shape[0]

    @property
    def n_embd(self) -> int:
        return self.W_dec.shape[1]

    def pre(self, x: np.ndarray) -> np.ndarray:
        xs = np.asarray(x, np.float32) * np.float32(self.scale)
        return (xs - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-k latents per row: (indices (n, k) int32, values (n, k) float32, >= 0)."""
        return topk(self.pre(x), self.k)

    def encode_dense(self, x: np.ndarray) -> np.ndarray:
        idx, val = self.encode(x)
        z = np.zeros((len(idx), self.width), np.float32)
        np.put_along_axis(z, idx, val, axis=1)
        return z

    def decode(self, idx: np.ndarray, val: np.ndarray) -> np.ndarray:
        """Reconstruction in the caller's (unscaled) units."""
        xs = np.einsum("bk,bkd->bd", val, self.W_dec[idx]) + self.b_dec
        return xs / np.float32(self.scale)

    def fvu(self, x: np.ndarray, chunk: int = 4096) -> float:
        """Fraction of variance unexplained over the rows of x."""
        x = np.asarray(x, np.float32)
        mu = x.mean(axis=0)
        err = tot = 0.0
        for i in range(0, len(x), chunk):
            xb = x[i : i + chunk]
            r = self.decode(*self.encode(xb))
            err += float(np.square(r - xb).sum())
            tot += float(np.square(xb - mu).sum())
        return err / tot if tot > 0 else float("nan")


_POOL = None


def _argtop(pre: np.ndarray, k: int) -> np.ndarray:
    return np.argpartition(pre, -k, axis=1)[:, -k:]


def topk(pre: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and ReLU'd values of the k largest entries per row. The partition is the
    costliest step of training and numpy runs it on one core without the GIL, so large
    batches are split over two threads."""
    global _POOL
    if len(pre) >= 512:
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _POOL = ThreadPoolExecutor(2)
        h = len(pre) // 2
        a, b = _POOL.map(_argtop, (pre[:h], pre[h:]), (k, k))
        idx = np.concatenate([a, b])
    else:
        idx = _argtop(pre, k)
    val = np.take_along_axis(pre, idx, axis=1)
    np.maximum(val, 0, out=val)
    return idx.astype(np.int32), val


class _Adam:
    def __init__(self, shape, b1=0.9, b2=0.999, eps=1e-8):
        self.m = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)
        self.b1, self.b2, self.eps, self.t = b1, b2, eps, 0
        self._tmp = np.empty(shape, np.float32)

    def step(self, p: np.ndarray, g: np.ndarray, lr: float, t: int) -> None:
        m, v, tmp = self.m, self.v, self._tmp
        m *= self.b1
        m += (1 - self.b1) * g
        np.square(g, out=tmp)
        v *= self.b2
        tmp *= 1 - self.b2
        v += tmp
        c1 = 1 - self.b1**t
        c2 = 1 - self.b2**t
        np.sqrt(v, out=tmp)
        tmp *= 1 / math.sqrt(c2)
        tmp += self.eps
        np.divide(m, tmp, out=tmp)
        tmp *= lr / c1
        p -= tmp


def split_holdout(doc: np.ndarray, every: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows): whole documents are held out, never halves of one."""
    held = (doc % every) == every - 1
    return np.flatnonzero(~held), np.flatnonzero(held)


def _init_params(sample: np.ndarray, n: int, rng: np.random.Generator) -> tuple[float, dict[str, np.ndarray]]:
    """(input scale, parameters): decoder rows random unit vectors, encoder their transpose,
    b_dec the (scaled) median input."""
    d = sample.shape[1]
    scale = float(math.sqrt(d) / np.linalg.norm(sample, axis=1).mean())
    b_dec = (np.median(sample, axis=0) * scale).astype(np.float32)
    W_dec = rng.standard_normal((n, d)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    W_enc = np.ascontiguousarray(W_dec.T)
    return scale, {"W_enc": W_enc, "b_enc": np.zeros(n, np.float32), "W_dec": W_dec, "b_dec": b_dec}


def _lr_at(cfg: SAEConfig, step: int, total: int) -> float:
    """Linear warm-up, then flat, then linear decay to 0 over the last (1 - decay_from)."""
    lr = cfg.lr * min(1.0, step / max(1, cfg.warmup))
    if step > cfg.decay_from * total:
        lr *= max(0.0, (total - step) / max(1.0, (1 - cfg.decay_from) * total))
    return lr


def _aux_grads(cfg: SAEConfig, pre: np.ndarray, e: np.ndarray, W_dec: np.ndarray, dead: np.ndarray,
               rows: np.ndarray, gW_dec: np.ndarray, G: np.ndarray) -> float:
    """AuxK: the dead latents' top pre-activations reconstruct the main residual. Adds
    their gradients into gW_dec and G (wrt pre-activations) in place; returns the loss."""
    B = len(pre)
    ka = min(cfg.aux_k, len(dead))
    apre = pre[:, dead]
    aidx, aval = topk(apre, ka)
    Wa = W_dec[dead]
    ehat = np.einsum("bk,bkd->bd", aval, Wa[aidx])
    target = -e  # the main residual (x' - x^), treated as a constant
    denom = float(np.square(target - target.mean(axis=0)).sum()) / B + 1e-9
    diff = ehat - target
    aux = cfg.aux_coef * float(np.square(diff).sum()) / B / denom
    gA = diff * np.float32(2 * cfg.aux_coef / (B * denom))
    gaval = np.einsum("bd,bkd->bk", gA, Wa[aidx]) * (aval > 0)
    Za = np.zeros((B, len(dead)), np.float32)
    Za[rows, aidx] = aval
    gW_dec[dead] += Za.T @ gA
    Ga = np.zeros((B, len(dead)), np.float32)
    Ga[rows, aidx] = gaval
    G[:, dead] += Ga
    return aux


def train_sae(
    x: np.ndarray,
    cfg: SAEConfig,
    doc: np.ndarray | None = None,
    progress: Callable[[int, dict], None] | None = None,
) -> SAE:
    """Train on rows of x (n, n_embd); `doc` ids decide the held-out split."""
    x = np.asarray(x, np.float32)
    n_rows, d = x.shape
    if n_rows < cfg.batch:
        raise MorphError(f"{n_rows} activation rows: need at least one batch of {cfg.batch}")
    doc = np.arange(n_rows) // 64 if doc is None else np.asarray(doc)
    tr, ho = split_holdout(doc, cfg.holdout_every)
    if len(ho) == 0:
        ho = tr[-max(1, len(tr) // 20):]
        tr = tr[: len(tr) - len(ho)]
    rng = np.random.default_rng(cfg.seed)
    n, k = cfg.width, cfg.k

    scale, params = _init_params(x[rng.choice(tr, size=min(len(tr), 20_000), replace=False)], n, rng)
    opt = {name: _Adam(p.shape) for name, p in params.items()}
    since_fired = np.zeros(n, np.int64)  # tokens since each latent last fired

    B = cfg.batch
    total = max(1, int(round(cfg.epochs * (len(tr) // B))))
    sc = np.float32(scale)
    Z = np.zeros((B, n), np.float32)  # dense code matrix, reused
    G = np.zeros((B, n), np.float32)  # dense gradient wrt pre-activations, reused
    rows = np.arange(B)[:, None]
    t0 = time.perf_counter()
    order = np.array([], np.int64)
    hist = []
    for step in range(1, total + 1):
        if len(order) < B:
            order = np.concatenate([order, rng.permutation(tr)])
        bi, order = order[:B], order[B:]
        lr = _lr_at(cfg, step, total)
        loss, aux, dead = _step(cfg, x[bi] * sc, params, opt, since_fired, (Z, G, rows), lr, step)

        if progress is not None or step % 50 == 0 or step == total:
            info = {"step": step, "steps": total, "loss": loss, "aux": aux, "dead": int(len(dead)),
                    "lr": lr}
            if step % 50 == 0 or step == total:
                hist.append(info)
            if progress is not None:
                progress(step, info)

    sae = SAE(params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"], k, scale)
    sae.meta = _scores(sae, x, tr, ho) | {
        "steps": total,
        "dead_at_end": int((since_fired >= cfg.dead_tokens).sum()),
        "train_s": round(time.perf_counter() - t0, 1),
        "config": {k_: getattr(cfg, k_) for k_ in cfg.__dataclass_fields__},
        "history": [{k_: (round(v, 5) if isinstance(v, float) else v) for k_, v in h.items()} for h in hist],
    }
    return sae


def _step(cfg: SAEConfig, xb: np.ndarray, params: dict, opt: dict, since_fired: np.ndarray, buffers, lr: float,
          step: int) -> tuple[float, float, np.ndarray]:
    """One Adam step on batch `xb` (already scaled); returns (loss, aux loss, dead latents).
    `buffers`: the dense (B, width) code and gradient matrices and the row index, reused."""
    W_enc, b_enc, W_dec, b_dec = (params[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec"))
    Z, G, rows = buffers
    B, n = Z.shape
    xc = xb - b_dec
    pre = xc @ W_enc
    pre += b_enc
    idx, val = topk(pre, cfg.k)
    Wg = W_dec[idx]  # (B, k, d)
    recon = np.einsum("bk,bkd->bd", val, Wg)
    recon += b_dec
    e = recon - xb
    loss = float(np.square(e).sum()) / B
    gE = e * np.float32(2.0 / B)  # d loss / d recon

    fired = np.zeros(n, bool)
    fired[idx[val > 0]] = True
    since_fired += B
    since_fired[fired] = 0
    dead = np.flatnonzero(since_fired >= cfg.dead_tokens)

    # Main path gradients.
    gval = np.einsum("bd,bkd->bk", gE, Wg)
    gval *= val > 0
    Z.fill(0)
    Z[rows, idx] = val
    gW_dec = Z.T @ gE
    G.fill(0)
    G[rows, idx] = gval
    aux = _aux_grads(cfg, pre, e, W_dec, dead, rows, gW_dec, G) if len(dead) and cfg.aux_coef > 0 else 0.0
    gW_enc = xc.T @ G
    gsum = G.sum(axis=0)
    gb_dec = gE.sum(axis=0) - W_enc @ gsum  # b_dec enters the encoder input too
    # Unit-norm decoder rows: drop the radial part of their gradient.
    gW_dec -= np.einsum("nd,nd->n", gW_dec, W_dec)[:, None] * W_dec

    opt["W_enc"].step(W_enc, gW_enc, lr, step)
    opt["b_enc"].step(b_enc, gsum, lr, step)
    opt["W_dec"].step(W_dec, gW_dec, lr, step)
    opt["b_dec"].step(b_dec, gb_dec, lr, step)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    return loss, aux, dead


def _scores(sae: SAE, x: np.ndarray, tr: np.ndarray, ho: np.ndarray) -> dict:
    """Held-out and training FVU, L0, and the split sizes."""
    ho_x = x[ho[:50_000]]
    return {
        "fvu": round(sae.fvu(ho_x), 5),
        "fvu_train": round(sae.fvu(x[tr[:20_000]]), 5),
        "l0": round(float((sae.encode(ho_x[:20_000])[1] > 0).sum(axis=1).mean()), 3),
        "train_tokens": int(len(tr)),
        "heldout_tokens": int(len(ho)),
    }
