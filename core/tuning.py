"""AutoRound for one block: SignSGD-tuned rounding offsets and min/max clipping factors.

``tune_block`` swaps the forward of each given nn.Linear for one that uses the fake-quantized
weight, calls the caller's ``loss_fn`` on mini-batches of calibration samples, and updates the
parameters with SignSGD under a linearly decaying learning rate.  The parameters of the iteration
with the lowest loss are kept; their quantized weights are written back into the layers, so the
block afterwards computes the quantized function.  ``iters == 0`` is round-to-nearest (RTN).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .config import QuantScheme
from .quantizers import GroupedWeight, QuantizedWeight


@dataclass
class TuneResult:
    """What tuning one block produced.  Losses are per iteration: the sum over its accumulation
    steps of loss / gradient_accumulate_steps (the mean of the mini-batch losses)."""

    weights: dict[str, QuantizedWeight]
    first_loss: float | None
    best_loss: float | None
    best_iter: int | None
    iters_run: int
    fell_back_to_rtn: bool
    seconds: float


class _TunedLinear:
    """Tuning state of one layer and the forward that replaces the layer's own while tuning."""

    def __init__(self, layer: torch.nn.Linear, scheme: QuantScheme, tune_minmax: bool):
        if not isinstance(layer, torch.nn.Linear):
            raise TypeError(f"tune_block handles torch.nn.Linear layers, got {type(layer).__name__}")
        self.layer = layer
        self.grouped = GroupedWeight(layer.weight, scheme)
        w = self.grouped.w
        self.v = torch.zeros(layer.weight.shape, dtype=torch.float32, device=w.device, requires_grad=True)
        ones = torch.ones(w.shape[:2], dtype=torch.float32, device=w.device)
        self.min_scale = ones.clone().requires_grad_(tune_minmax)
        self.max_scale = ones.requires_grad_(tune_minmax)
        self.best: tuple[torch.Tensor, ...] | None = None     # None: the initial (RTN) parameters
        self._cache_key = None
        self._cache = None
        self._saved = None

    # --- the replacement forward -------------------------------------------------------------
    def weight(self, generation: int) -> torch.Tensor:
        """The fake-quantized weight, computed once per loss_fn call (samples may run separately)."""
        key = (generation, torch.is_grad_enabled())
        if self._cache_key != key:
            self._cache = self.grouped.fake(self.v, self.min_scale, self.max_scale)
            self._cache_key = key
        return self._cache

    def install(self, generation: Callable[[], int]) -> None:
        layer = self.layer
        bias = None if layer.bias is None else layer.bias.detach()

        def forward(x, *args, **kwargs):
            return F.linear(x, self.weight(generation()), bias)

        # Under accelerate hooks, ``forward`` is the hook's wrapper that calls ``_old_forward``.
        attr = "_old_forward" if "_old_forward" in layer.__dict__ else "forward"
        self._saved = (attr, layer.__dict__.get(attr, _MISSING))
        setattr(layer, attr, forward)

    def uninstall(self) -> None:
        if self._saved is None:
            return
        attr, old = self._saved
        if old is _MISSING:
            delattr(self.layer, attr)
        else:
            setattr(self.layer, attr, old)
        self._saved = None
        self._cache = self._cache_key = None

    # --- parameters ----------------------------------------------------------------------------
    def params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.v, self.min_scale, self.max_scale

    def remember_best(self) -> None:
        if self.best is None:
            self.best = tuple(p.detach().clone() for p in self.params())
        else:
            for b, p in zip(self.best, self.params()):
                b.copy_(p)

    def quantized(self, rtn: bool) -> QuantizedWeight:
        if rtn:
            return self.grouped.quantize()
        return self.grouped.quantize(*(self.best if self.best is not None else self.params()))


_MISSING = object()


def _warn(log, message: str) -> None:
    """``log`` is a logging.Logger (its ``warning``) or any callable taking one string."""
    if log is not None:
        getattr(log, "warning", log)(message)


def tune_block(
    layers: dict[str, torch.nn.Linear],
    scheme: QuantScheme,
    loss_fn: Callable[[list[int]], torch.Tensor],
    nsamples: int,
    *,
    iters: int,
    lr: float,
    minmax_lr: float,
    batch_size: int,
    gradient_accumulate_steps: int,
    seed: int,
    log=None,
) -> TuneResult:
    """Tune and quantize the nn.Linear ``layers`` of one block in place; see the module docstring.

    ``loss_fn(indices)`` runs the block on those calibration samples and returns a scalar loss.
    Each iteration draws ``gradient_accumulate_steps`` mini-batches of min(batch_size, nsamples)
    indices from a generator seeded with ``seed``.  A NaN/Inf loss stops tuning and the block falls
    back to RTN.  ``log``: a logging.Logger or a callable taking one line (None: silent).
    """
    start = time.perf_counter()
    if iters < 0 or nsamples <= 0 or batch_size <= 0 or gradient_accumulate_steps <= 0:
        raise ValueError("tune_block needs iters >= 0 and positive nsamples, batch_size, gradient_accumulate_steps")
    if iters == 0:
        return TuneResult(_rtn(layers, scheme), None, None, None, 0, False, time.perf_counter() - start)
    states = {name: _TunedLinear(layer, scheme, tune_minmax=iters > 0 and minmax_lr > 0)
              for name, layer in layers.items()}
    first_loss = best_loss = best_iter = None
    iters_run, fell_back = 0, False
    if iters > 0 and states:
        run = _Run(states, loss_fn, nsamples, batch_size, gradient_accumulate_steps, seed)
        first_loss, best_loss, best_iter, iters_run, fell_back = run.tune(iters, lr, minmax_lr, log)
    weights = {}
    with torch.no_grad():
        for name, st in states.items():
            weights[name] = qw = st.quantized(rtn=iters == 0 or fell_back)
            st.layer.weight.copy_(qw.dequantize(st.layer.weight.dtype))
    return TuneResult(weights, first_loss, best_loss, best_iter, iters_run, fell_back, time.perf_counter() - start)


@torch.no_grad()
def _rtn(layers: dict[str, torch.nn.Linear], scheme: QuantScheme) -> dict[str, QuantizedWeight]:
    """Round to nearest, one layer at a time (no tuning state: peak memory stays one layer's worth)."""
    weights = {}
    for name, layer in layers.items():
        if not isinstance(layer, torch.nn.Linear):
            raise TypeError(f"tune_block handles torch.nn.Linear layers, got {type(layer).__name__}")
        w = layer.weight
        rows = max(1, RTN_CHUNK_ELEMENTS // w.shape[1])   # bounded temporaries for large layers
        parts = [GroupedWeight(w[r:r + rows], scheme).quantize() for r in range(0, w.shape[0], rows)]
        qw = QuantizedWeight(qweight=torch.cat([p.qweight for p in parts]), scale=torch.cat([p.scale for p in parts]),
                             zero=torch.cat([p.zero for p in parts]), scheme=scheme)
        for r, part in zip(range(0, w.shape[0], rows), parts):
            w[r:r + rows].copy_(part.dequantize(w.dtype))
        weights[name] = qw
    return weights


RTN_CHUNK_ELEMENTS = 8 * 2 ** 20


class _Run:
    """One tuning run: index sampling, the iteration loop and the SignSGD step."""

    def __init__(self, states, loss_fn, nsamples, batch_size, accumulate, seed):
        self.states = list(states.values())
        self.loss_fn = loss_fn
        self.nsamples = nsamples
        self.batch = min(batch_size, nsamples)
        self.accumulate = accumulate
        self.generator = torch.Generator().manual_seed(seed)
        self.generation = 0
        self._perm: list[int] = []

    def _indices(self) -> list[int]:
        """The next mini-batch of distinct indices: a slice of a random permutation of the samples
        (a fresh one each iteration, and whenever the rest is shorter than a batch)."""
        if len(self._perm) < self.batch:
            self._perm = torch.randperm(self.nsamples, generator=self.generator).tolist()
        out, self._perm = self._perm[:self.batch], self._perm[self.batch:]
        return out

    def tune(self, iters, lr, minmax_lr, log):
        """Returns (first_loss, best_loss, best_iter, iters_run, fell_back_to_rtn)."""
        vs = [st.v for st in self.states]
        scales = [p for st in self.states for p in (st.min_scale, st.max_scale) if p.requires_grad]
        first = best = best_iter = None
        try:
            for st in self.states:
                st.install(lambda: self.generation)
            with torch.enable_grad():
                for it in range(iters):
                    self._perm = []          # each iteration draws a fresh permutation
                    loss = self._iteration()
                    if loss is None:
                        _warn(log, f"non-finite loss at iteration {it}: this block falls back to RTN")
                        return first, None, None, it, True
                    if it == 0:
                        first = loss
                    if best is None or loss < best:
                        best, best_iter = loss, it
                        for st in self.states:
                            st.remember_best()
                    if it + 1 < iters:       # the last step's result would never be evaluated
                        factor = 1.0 - it / iters
                        _sign_step(vs, lr * factor, -0.5, 0.5)
                        _sign_step(scales, minmax_lr * factor, 0.0, 1.0)
                    _clear_grads(vs + scales)
        finally:
            for st in reversed(self.states):      # reverse: a module listed twice ends up clean
                st.uninstall()
            _clear_grads(vs + scales)
        return first, best, best_iter, iters, False

    def _iteration(self) -> float | None:
        """Forward and backward over the accumulation steps; None when a loss is NaN or Inf."""
        total = 0.0
        for _ in range(self.accumulate):
            indices = self._indices()
            self.generation += 1
            loss = self.loss_fn(indices)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError("loss_fn must return a scalar tensor")
            value = float(loss.detach())
            if not math.isfinite(value):
                return None
            if not loss.requires_grad:
                raise RuntimeError("loss_fn returned a loss without grad: run the block with grad enabled")
            (loss / self.accumulate).backward()
            total += value / self.accumulate
        return total


@torch.no_grad()
def _sign_step(params: list[torch.Tensor], lr: float, low: float, high: float) -> None:
    """p <- clamp(p - lr * sign(grad), low, high), in place (params without a grad stay put)."""
    live = [p for p in params if p.grad is not None]
    if not live or lr == 0:
        return
    grads = [p.grad for p in live]
    torch._foreach_sign_(grads)
    torch._foreach_add_(live, grads, alpha=-lr)
    torch._foreach_clamp_min_(live, low)
    torch._foreach_clamp_max_(live, high)


def _clear_grads(params: list[torch.Tensor]) -> None:
    for p in params:
        p.grad = None
