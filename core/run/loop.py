"""The block loop (data flow step 9): for each block of each group,
fp targets -> tune (AutoRound) or RTN -> quantized outputs feed the next block -> pack -> write -> free.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from ..algorithm.compiled import compile_block, use_compile
from ..algorithm.tuning import tune_block
from ..resources import devices
from ..resources.devices import to_device
from ..model.blocks import Block, choose_layers
from ..errors import BlockquantError
from ..model.model_io import all_finite
from .replay import Replayer, stream_loss, stream_sse
from .report import BlockRecord, TuningProgress
from .resume import restore_result
from .store import GroupState
from ..model.streaming import free_memory

log = logging.getLogger("blockquant")


@dataclass
class LoopResult:
    blocks: list[BlockRecord] = field(default_factory=list)
    quantized: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    tuning_seconds: float = 0.0
    weights: dict = field(default_factory=dict)    # layer -> QuantizedWeight (codes, scales), when blocks are kept


class BlockLoop:
    """Runs step 9 over every group; ``ctx`` is the prepared run (see run.context.Run)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.s = ctx.settings
        self.result = LoopResult()
        if ctx.resume:
            restore_result(ctx.resume.saved, self.result)

    def run(self) -> LoopResult:
        ctx = self.ctx
        for g, chain in enumerate(ctx.groups):
            # no stores: RTN straight from the weights (settings.weights_only), nothing to replay
            store = ctx.stores[g] if ctx.stores else None
            replayer = Replayer(ctx.hooks, store, ctx.device, ctx.compute_dtype, ctx.traits.max_batch_size,
                                pad=ctx.traits.pad_samples, pack=ctx.traits.pack_boundaries,
                                state=ctx.traits.sample_state, shared=ctx.traits.shared_keys) \
                if store is not None else None
            state = ctx.resume.restore_group(g, len(chain)) if ctx.resume else None
            if state is None:
                state = GroupState.start(store) if store is not None else GroupState(0, [], [], [], [])
            for block in chain[state.position:]:
                try:
                    self._one_block(block, replayer, state)
                except torch.cuda.OutOfMemoryError:
                    if ctx.dp is not None:     # the ranks must stay on one kind of device
                        raise BlockquantError(f"CUDA out of memory in block {block.ref.name} on rank {ctx.dp.rank}; "
                                              "lower --batch_size or use --cache_device cpu") from None
                    log.warning("CUDA out of memory in block %s: continuing on the CPU (lower --batch_size or "
                                "use --cache_device cpu to stay on the GPU)", block.ref.name)
                    devices.fall_back_to_cpu(ctx)
                    ctx.loader.release(block)   # streamed: the retry reads the original weights again
                    if replayer is not None:
                        replayer.device, replayer.dtype = ctx.device, ctx.compute_dtype
                    self._one_block(block, replayer, state)
                state.position = block.ref.position + 1
                if ctx.resume:
                    ctx.resume.block_done(block, g, state, ctx.writer, self.result)
                ctx.check_interrupt()
        return self.result

    def _one_block(self, block: Block, replayer: Replayer | None, state: GroupState) -> None:
        ctx, s = self.ctx, self.s
        start = time.time()
        ctx.loader.load(block)
        dtypes = {k: v.dtype for k, v in block.module.state_dict().items()}
        dispatched = devices.place_block(block.module, ctx.device, ctx.compute_dtype, s.device_map)
        for p in block.module.parameters():
            p.requires_grad_(False)
        choice = choose_layers(block, s.scheme, ctx.traits.fp_layers, s.ignore_layers)
        self.result.kept.update(choice.kept)
        tune = s.iters > 0 and bool(choice.quantize) and replayer is not None
        batch = s.batch_size
        with torch.no_grad():
            targets = replayer.run(block, state.fp, state.fp_states, "fp", batch=batch) if tune else None
        record = BlockRecord(block.ref.name, layers=len(choice.quantize))
        quantized = {}
        if choice.quantize:
            def loss_fn(indices):
                if ctx.dp is None:
                    ctx.check_interrupt(abandon=True)
                outs = replayer.run(block, state.quant, state.quant_states, "quant", indices, batch=len(indices))
                wanted = [targets[i] for i in indices]
                if ctx.dp is None:
                    return stream_loss(outs, wanted)
                # ranks abandon the block together: a signal seen by one is passed on with the loss
                loss, signalled = ctx.dp.mean_loss(*stream_sse(outs, wanted), stop=ctx.interrupted is not None)
                if signalled:
                    ctx.interrupted = ctx.interrupted or "a signal to another rank"
                    ctx.check_interrupt(abandon=True)
                return loss

            held, batch, seed = None, s.batch_size, s.seed + block.ref.number
            if ctx.dp is not None:   # this rank's samples, its share of a batch, its own draws from them
                held = [i for i, x in enumerate(state.quant) if x is not None]
                batch = ctx.dp.batch_share(len(held), s.batch_size)
                seed += 7919 * ctx.dp.rank
            t0 = time.time()
            weights = sum(layer.weight.numel() for layer in choice.quantize.values())
            compiled = tune and use_compile(s.compile, ctx.device, weights)
            if compiled:   # the loss's forwards and backwards (compilation time counts as tuning time)
                replayer.compiled[block.ref.number] = compile_block(block.module)
            try:
                with ctx.autocast():
                    result = tune_block(
                        choice.quantize, s.scheme, loss_fn, max(len(state.quant), 1), iters=s.iters, lr=s.effective_lr,
                        minmax_lr=s.effective_minmax_lr, batch_size=batch,
                        gradient_accumulate_steps=s.gradient_accumulate_steps, seed=seed, log=log,
                        reduce_grads=ctx.dp.reduce_grads if ctx.dp else None,
                        progress=TuningProgress(block.ref.name, s.iters, log), samples=held,
                        compiled=compiled,
                    )
            finally:
                if replayer is not None:
                    replayer.compiled.pop(block.ref.number, None)
            self.result.tuning_seconds += time.time() - t0
            quantized = result.weights
            record.first_loss, record.best_loss, record.best_iter = result.first_loss, result.best_loss, result.best_iter
            record.rtn_fallback = result.fell_back_to_rtn
            self.result.quantized.extend(choice.quantize)
        if replayer is not None:
            self._advance(block, replayer, state, targets)
        if ctx.writer is not None:   # the run's outputs (export.outputs.Outputs)
            ctx.writer.add_block(block, dtypes, quantized)
        if dispatched:
            devices.unplace_block(block.module, ctx.hooks, ctx.model)
        if ctx.keep_blocks:
            self.result.weights.update(quantized)
            block.module.to(dtype=ctx.model_dtype)
        else:
            ctx.loader.release(block)
        free_memory()
        record.seconds = time.time() - start
        self.result.blocks.append(record)
        ctx.progress.block_done(block.ref.name, **_progress_info(record))

    def _advance(self, block: Block, replayer: Replayer, state: GroupState, targets) -> None:
        """The quantized block's outputs become the next block's inputs (both streams)."""
        ctx = self.ctx
        with torch.no_grad():
            outputs = replayer.run(block, state.quant, state.quant_states, "quant", batch=self.s.batch_size)
        finite = all(_finite(o) for o in outputs)
        if not (ctx.dp.all_true(finite) if ctx.dp else finite):   # every rank stops together
            raise BlockquantError(
                f"block {block.ref.name} produced NaN/Inf outputs; the weights or the calibration overflow in "
                f"{ctx.compute_dtype} (check the checkpoint, or try --device cpu, which computes in float32)")
        cache = ctx.cache_device
        state.quant = [to_device(o, cache) for o in outputs]
        if targets is not None:
            state.fp = [to_device(t, cache) for t in targets]
        else:   # nothing tuned here: the fp stream continues from the quantized one, state included
            state.fp = state.quant
            state.fp_states = [dict(s) for s in state.quant_states]


def _finite(value) -> bool:
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or all_finite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return True


def _progress_info(record: BlockRecord) -> dict:
    return {"layers": record.layers, "first_loss": record.first_loss, "best_loss": record.best_loss,
            "seconds": record.seconds, "rtn": record.rtn_fallback}
