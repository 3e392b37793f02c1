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

from ..config import QuantScheme
from ..resources.memory import heap_for_temporaries, trim_heap
from .compiled import traced_forward
from .quantizers import GroupedWeight, QuantizedWeight
from .tuned_linear import DEQUANT_CHUNK_ELEMENTS, Scratch, TunedLinear, row_chunks, write_dequantized


# Up to this many multiply-adds per forward of the tuned layers (rows of input x weights), a block's
# ops are too small for intra-op threads to pay off (each parallel op synchronizes the threads; on a
# busy machine a descheduled thread stalls every op): such blocks tune on one CPU thread.  The
# decision depends only on shapes, so it is the same on every run.
SERIAL_MAX_WORK = 2 ** 26


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
    reduce_grads: Callable[[list[torch.Tensor]], None] | None = None,
    progress: Callable[[int, float], None] | None = None,
    samples: list[int] | None = None,
    compiled: bool = False,
) -> TuneResult:
    """Tune and quantize the nn.Linear ``layers`` of one block in place; see the module docstring.

    ``loss_fn(indices)`` runs the block on those calibration samples and returns a scalar loss.
    Each iteration draws ``gradient_accumulate_steps`` mini-batches of min(batch_size, nsamples)
    indices from a generator seeded with ``seed``.  A NaN/Inf loss stops tuning and the block falls
    back to RTN.  ``log``: a logging.Logger or a callable taking one line (None: silent).
    ``reduce_grads(params)``: called before each step to combine the parameters' gradients in place
    (data-parallel runs: the sum over ranks); the steps then follow the backward, not its hooks.
    ``progress(iterations_done, loss)`` is called after every iteration (e.g. a rate-limited log line).
    ``samples``: the indices the mini-batches are drawn from (default: all ``nsamples``; a data-parallel
    rank passes the ones it holds, and its share of the batch as ``batch_size``).
    ``compiled``: the layers' forwards are plain autograd ops (compiled.py) for a caller that runs the
    block through torch.compile.
    """
    start = time.perf_counter()
    if iters < 0 or nsamples <= 0 or batch_size <= 0 or gradient_accumulate_steps <= 0:
        raise ValueError("tune_block needs iters >= 0 and positive nsamples, batch_size, gradient_accumulate_steps")
    if iters == 0:
        return TuneResult(_rtn(layers, scheme), None, None, None, 0, False, time.perf_counter() - start)
    if not layers:
        return TuneResult({}, None, None, None, 0, False, time.perf_counter() - start)
    states: dict[str, TunedLinear] = {}
    scratch = Scratch()
    try:
        for name, layer in layers.items():
            states[name] = TunedLinear(layer, scheme, tune_minmax=minmax_lr > 0, scratch=scratch)
        run = _Run(states, loss_fn, range(nsamples) if samples is None else samples, batch_size,
                   gradient_accumulate_steps, seed)
        run.reduce_grads = reduce_grads
        run.compiled = compiled
        first_loss, best_loss, best_iter, iters_run, fell_back = run.tune(iters, lr, minmax_lr, log, progress)
    except BaseException:
        for st in states.values():       # leave the layers as they were
            st.finish(None)
        raise
    weights = {}
    for name, st in states.items():
        weights[name] = qw = st.quantized(rtn=fell_back)
        st.finish(qw)
    return TuneResult(weights, first_loss, best_loss, best_iter, iters_run, fell_back, time.perf_counter() - start)


@torch.no_grad()
def _rtn(layers: dict[str, torch.nn.Linear], scheme: QuantScheme) -> dict[str, QuantizedWeight]:
    """Round to nearest, one layer at a time (no tuning state: peak memory stays one layer's worth)."""
    weights = {}
    for name, layer in layers.items():
        if not isinstance(layer, torch.nn.Linear):
            raise TypeError(f"tune_block handles torch.nn.Linear layers, got {type(layer).__name__}")
        w = layer.weight
        parts = [GroupedWeight(w[rows], scheme).quantize() for rows in row_chunks(w.shape, DEQUANT_CHUNK_ELEMENTS)]
        qw = QuantizedWeight(qweight=torch.cat([p.qweight for p in parts]), scale=torch.cat([p.scale for p in parts]),
                             zero=torch.cat([p.zero for p in parts]), scheme=scheme)
        del parts
        write_dequantized(w, qw)
        weights[name] = qw
    return weights



class _Run:
    """One tuning run: index sampling, the iteration loop and the SignSGD step."""

    def __init__(self, states, loss_fn, samples, batch_size, accumulate, seed):
        self.states = list(states.values())
        self.loss_fn = loss_fn
        self.samples = samples        # the sample indices the mini-batches are drawn from
        self.batch = min(batch_size, len(samples))
        self.accumulate = accumulate
        self.generator = torch.Generator().manual_seed(seed)
        self.best_loss: float | None = None
        self.best_iter: int | None = None
        self.bounds: dict[int, tuple[float, float, float]] = {}   # id(param) -> (lr, low, high)
        self.factor: float | None = None     # this iteration's lr factor; None: no step
        self._perm: list[int] = []
        self._threads: int | None = None     # the thread count to restore after a serial run
        self.reduce_grads = None   # see tune_block
        self.compiled = False      # see tune_block

    def _indices(self) -> list[int]:
        """The next mini-batch of distinct indices: a slice of a random permutation of the samples
        (a fresh one each iteration, and whenever the rest is shorter than a batch)."""
        if len(self._perm) < self.batch:
            order = torch.randperm(len(self.samples), generator=self.generator).tolist()
            self._perm = [self.samples[i] for i in order]
        out, self._perm = self._perm[:self.batch], self._perm[self.batch:]
        return out

    def tune(self, iters, lr, minmax_lr, log, progress=None):
        """Returns (first_loss, best_loss, best_iter, iters_run, fell_back_to_rtn)."""
        vs = [st.v for st in self.states]
        scales = [p for st in self.states for p in (st.min_scale, st.max_scale) if p.requires_grad]
        first = None
        hooks = []
        self.bounds = {id(p): (lr, -0.5, 0.5) for p in vs}
        self.bounds.update({id(p): (minmax_lr, 0.0, 1.0) for p in scales})
        try:
            for st in self.states:
                st.install(traced_forward(st) if self.compiled else None)
            hooked = self.accumulate == 1 and self.reduce_grads is None
            if hooked:      # step each parameter as soon as its gradient is complete
                hooks = [p.register_post_accumulate_grad_hook(self._step_now) for p in vs + scales]
            # one allocator switch for the whole loop: the steps' temporaries are freed before the
            # next step reallocates them at the same sizes, and nothing long-lived is allocated
            # inside (the best iteration goes into buffers allocated at the first one)
            with torch.enable_grad(), heap_for_temporaries():
                for it in range(iters):
                    self._perm = []          # each iteration draws a fresh permutation
                    # linear decay; no step after the last iteration (its result would never be evaluated)
                    self.factor = 1.0 - it / iters if it + 1 < iters else None
                    loss = self._iteration(it)
                    if loss is None:
                        _warn(log, f"non-finite loss at iteration {it}: this block falls back to RTN")
                        return first, None, None, it, True
                    if it == 0:
                        first = loss
                        self._fit_threads()
                    if progress is not None:
                        progress(it + 1, loss)
                    if not hooked:
                        if self.reduce_grads is not None and self.factor is not None:
                            self.reduce_grads(vs + scales)
                        for p in vs + scales:
                            self._step_now(p)
        finally:
            if self._threads is not None:
                torch.set_num_threads(self._threads)
            for h in hooks:
                h.remove()
            for st in reversed(self.states):      # reverse: a module listed twice ends up clean
                st.uninstall()
            _clear_grads(vs + scales)
            trim_heap()           # what the iterations' temporaries left in the heap
        return first, self.best_loss, self.best_iter, iters, False

    def _fit_threads(self) -> None:
        """After the first iteration (which showed the input rows): one thread for a small CPU block."""
        work = sum(st.rows * st.v.numel() for st in self.states)
        if self.states[0].v.device.type == "cpu" and work <= SERIAL_MAX_WORK and torch.get_num_threads() > 1:
            self._threads = torch.get_num_threads()
            torch.set_num_threads(1)

    def _iteration(self, it: int) -> float | None:
        """Forward and backward over the accumulation steps; None when a loss is NaN or Inf.

        A new best is remembered before any parameter steps: with one accumulation step, right
        after the forward (the backward's hooks step); with several, after the last backward."""
        total = 0.0
        for _ in range(self.accumulate):
            loss = self.loss_fn(self._indices())
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError("loss_fn must return a scalar tensor")
            value = float(loss.detach())
            if not math.isfinite(value):
                return None
            if not loss.requires_grad:
                raise RuntimeError("loss_fn returned a loss without grad: run the block with grad enabled")
            total += value / self.accumulate
            if self.accumulate == 1:
                self._note(it, total)
                if self.factor is None:
                    return total
            (loss / self.accumulate).backward()
            del loss
        if self.accumulate > 1:
            self._note(it, total)
        return total

    def _note(self, it: int, loss: float) -> None:
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss, self.best_iter = loss, it
            for st in self.states:
                st.remember_best()

    @torch.no_grad()
    def _step_now(self, p: torch.Tensor) -> None:
        """The SignSGD step of one parameter, p <- clamp(p - lr * sign(grad), low, high), then its
        gradient is dropped (post-accumulate-grad hook, or after the accumulation steps)."""
        lr, low, high = self.bounds[id(p)]
        if self.factor is not None and p.grad is not None and lr != 0:
            p.add_(p.grad.sign_(), alpha=-lr * self.factor).clamp_(low, high)
        p.grad = None


def _clear_grads(params: list[torch.Tensor]) -> None:
    for p in params:
        p.grad = None
