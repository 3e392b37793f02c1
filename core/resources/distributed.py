"""Data-parallel runs on torch.distributed: one process per GPU (or per CPU), launched by torchrun.

Every rank holds the current block.  The calibration samples are sharded at capture: rank r runs the
calibration batches r, r+N, r+2N, ... and keeps the samples they produce.  The run's per-sample lists
keep the single-process numbering, with None in the places of the other ranks' samples (``Replayer.run``
skips those).  Each iteration's mini-batch is the union of every rank's draw from the samples it holds,
a share of the batch size proportional to them (``batch_share``): every rank runs about batch/N samples,
where a mini-batch drawn from all samples would leave some ranks idle while one runs several.  The loss
of a mini-batch is the global mean (``mean_loss``): each rank's squared-error sum over the global
element count, so the summed gradients (``reduce_grads``) are the gradient one process computes on the
same samples, and every rank takes the same SignSGD step on identical parameters.  Rank 0 writes the
checkpoint.

Backends: gloo for CPU tensors, NCCL for CUDA tensors (each rank takes ``cuda:LOCAL_RANK``).
"""
from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as tdist
from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from ..errors import UsageError

log = logging.getLogger("blockquant")
BUCKET_BYTES = 32 * 2 ** 20      # gradients smaller than this are all-reduced together in one flat buffer


class _GlobalValue(torch.autograd.Function):
    """Forward: ``value`` (the global loss, the same bits on every rank); backward: into ``local``."""

    @staticmethod
    def forward(ctx, local, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class DataParallel:
    """This process's place in a data-parallel run and the collectives the run needs."""

    def __init__(self, rank: int, size: int, device: torch.device, owns_group: bool):
        self.rank, self.size, self.device = rank, size, device
        self.owns_group = owns_group          # started here (torchrun): destroyed by ``close``
        self._counts: list[list[int]] = []    # per captured batch of this rank: samples added per group
        self.reduced_bytes = 0                # gradient bytes all-reduced so far (the benchmark reads it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- capture: batches r, r+N, ... ------------------------------------------------------------
    def my_batches(self, batches: list) -> list:
        if len(batches) < self.size:
            raise UsageError(f"{len(batches)} calibration batch(es) for {self.size} ranks: every rank needs one; "
                             "raise --nsamples or start fewer ranks")
        return batches[self.rank::self.size]

    def counting(self, forward, sizes):
        """``forward`` that records how many samples each batch added to each store (``sizes()``)."""
        def run(batch):
            before = sizes()
            try:
                forward(batch)
            finally:
                self._counts.append([after - b for after, b in zip(sizes(), before)])
        return run

    def sample_positions(self, groups: int) -> list[tuple[list[int], int]]:
        """Per group: the single-process index of each sample this rank captured, and the total."""
        every = self.gather(self._counts)
        out = []
        for g in range(groups):
            mine, total = [], 0
            for j in range(sum(len(c) for c in every)):     # batch j was captured by rank j % size
                count = every[j % self.size][j // self.size][g]
                if j % self.size == self.rank:
                    mine.extend(range(total, total + count))
                total += count
            out.append((mine, total))
        return out

    # --- tuning ---------------------------------------------------------------------------------
    def batch_share(self, held: int, batch: int) -> int:
        """This rank's part of a mini-batch of ``batch`` samples when it holds ``held`` of them
        (``split_batch`` of every rank's count)."""
        counts = torch.zeros(self.size, dtype=torch.float64)
        counts[self.rank] = held
        tdist.all_reduce(counts)
        return split_batch(batch, [int(c) for c in counts.tolist()])[self.rank]

    def mean_loss(self, sse: torch.Tensor | None, count: int, stop: bool = False) -> tuple[torch.Tensor, bool]:
        """The mini-batch's global mean squared error from this rank's sum ``sse`` over ``count``
        elements (None: no sample here), and whether any rank passed ``stop``.  The loss's value is
        the global loss, identical on every rank; its gradient is this rank's share, so the sum over
        ranks is the global loss's gradient."""
        local = sse if sse is not None else torch.zeros((), device=self.device, requires_grad=True)
        stats = torch.cat([local.detach().double().reshape(1),
                             torch.tensor([float(count), float(stop)], dtype=torch.float64, device=local.device)])
        tdist.all_reduce(stats)
        total_sse, total_count, stops = stats.tolist()
        total_count = max(total_count, 1.0)
        value = torch.tensor(total_sse / total_count, dtype=torch.float32, device=local.device)
        return _GlobalValue.apply(local.float() / total_count, value), stops > 0

    @torch.no_grad()
    def reduce_grads(self, params: list[torch.Tensor]) -> None:
        """Sum every parameter's gradient over the ranks, in place (a missing one counts as zero).
        Large gradients go one by one; small ones together in flat buffers of ``BUCKET_BYTES``."""
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        bucket: list[torch.Tensor] = []
        for g in grads:
            nbytes = g.numel() * g.element_size()
            self.reduced_bytes += nbytes
            if nbytes >= BUCKET_BYTES:
                tdist.all_reduce(g)
                continue
            bucket.append(g)
            if sum(t.numel() * t.element_size() for t in bucket) >= BUCKET_BYTES:
                _reduce_flat(bucket)
                bucket = []
        if bucket:
            _reduce_flat(bucket)

    def all_true(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
        return bool(t.item())

    def barrier(self) -> None:
        tdist.all_reduce(torch.zeros(1))     # a CPU tensor: gloo, whatever the device backend

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        every: list = [None] * self.size
        tdist.all_gather_object(every, obj)
        return every

    def close(self) -> None:
        if self.owns_group and tdist.is_initialized():
            tdist.destroy_process_group()


def split_batch(batch: int, counts: list[int]) -> list[int]:
    """Each rank's part of a mini-batch of ``batch`` samples when the ranks hold ``counts`` samples: in
    proportion to them (largest remainders, ties to the lower rank), at least one each, never more
    than a rank holds; the parts add up to ``batch`` when every rank holds enough."""
    quotas = [batch * c / max(sum(counts), 1) for c in counts]
    shares = [int(q) for q in quotas]
    for r in sorted(range(len(counts)), key=lambda r: (shares[r] - quotas[r], r))[:batch - sum(shares)]:
        shares[r] += 1
    return [max(1, min(share, held)) for share, held in zip(shares, counts)]


def _reduce_flat(tensors: list[torch.Tensor]) -> None:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    tdist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def launched_ranks() -> int:
    """The number of ranks torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0, or not part of a data-parallel run (what prints and logs)."""
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def assign_device(settings) -> None:
    """Under torchrun on a CUDA machine each rank computes on ``cuda:LOCAL_RANK``; call before the
    run picks its device.  (The process group starts later, in ``start``: transformers saves nothing
    on ranks other than 0 once it is up, and preparing a run saves the example model.)"""
    spec = (settings.device or "auto").strip().lower()
    if launched_ranks() <= 1 and not (tdist.is_available() and tdist.is_initialized()):
        return
    if not is_main_process():
        log.setLevel(logging.ERROR)
    if spec.startswith("cuda:"):
        raise UsageError(f"--device {spec} with several ranks: pass --device cuda (each rank takes cuda:LOCAL_RANK)")
    if settings.device_map:
        raise UsageError("--device_map spreads one process over GPUs; with several ranks each holds a whole block")
    if spec != "cpu" and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        settings.device = f"cuda:{local}"


def start(device: torch.device) -> DataParallel | None:
    """Join the data-parallel run this process belongs to; None for a single process.

    Under torchrun (``WORLD_SIZE`` > 1) this starts the process group: NCCL for CUDA tensors with gloo
    for CPU ones when ``device`` is a GPU, gloo alone on the CPU.  A process group the caller already
    started is used as it is.  Ranks other than 0 log errors only.
    """
    owns = False
    if not (tdist.is_available() and tdist.is_initialized()):
        if launched_ranks() <= 1:
            return None
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
        owns = True
    if tdist.get_world_size() <= 1:
        return None
    dp = DataParallel(tdist.get_rank(), tdist.get_world_size(), device, owns)
    if not dp.is_main:
        log.setLevel(logging.ERROR)
    return dp


def launch(argv: list[str], nproc: int) -> int:
    """``quant --nproc N ...``: start N ranks of ``python -m blockquant ARGV`` on this machine through
    torch.distributed's own launcher (what ``torchrun --standalone --nproc_per_node N`` does)."""
    try:
        torchrun.main(["--standalone", "--nproc_per_node", str(nproc), "-m", "blockquant", *argv])
    except ChildFailedError as e:       # the ranks printed their own error lines
        codes = [f.exitcode for f in e.failures.values() if f.exitcode and f.exitcode > 0]
        return min(codes) if codes else 1
    except SignalException:             # Ctrl-C / SIGTERM: passed on to the ranks, which saved and said so
        return 130
    return 0
