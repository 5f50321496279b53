"""Gradients summed over the processes while the backward still runs (several processes, see
:class:`mdarts.processes.Ranks`).

DistributedDataParallel's reducer hooks into autograd's gradient accumulation; it cannot be
used here because the searcher's updates ask autograd for the gradient of one parameter group
at a time, and its readiness bookkeeping expects every parameter to get its gradient once per
backward in one graph. :class:`BucketedReduce` does the same job on the same signal: the
reversible layers are each their own autograd node (:mod:`mdarts.reversible`), so a layer's
parameters receive their gradients as soon as the backward has passed that layer, in every
memory mode, and the bucket holding them can be sent while the layers below are still being
differentiated.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

BUCKET_BYTES = 1 << 20  # gradients sent together; the tiny presets' ~2.4M parameters make ~10 buckets


class BucketedReduce:
    """Sums the gradients of ``params`` over the processes of ``ranks``, bucket by bucket,
    overlapping the backward; without effect in one process.

    Buckets hold about ``bucket_bytes`` of consecutive parameters in reverse registration order
    (the order the backward reaches them). A hook after each parameter's gradient accumulation
    counts it in; once every parameter of a bucket has its gradient, and every bucket before it
    has been sent, the bucket is flattened and sent with an asynchronous all-reduce. Buckets are
    sent in one fixed order on every process, as collectives must be. :meth:`finish` sends the
    buckets still waiting (those holding a parameter the step did not use), waits, and writes
    the sums back. Parameters without a gradient are left without one: every process must use
    the same parameters in a step (as with one process, they are then skipped by the optimiser).

    Use: ``reduce.start()``, the backward (``loss.backward()`` or ``torch.autograd.backward(loss,
    inputs=params)``: accumulation into ``.grad`` is what the hooks see), ``reduce.finish()``.
    ``launched_before_end`` counts, for the last step, the buckets sent while the backward ran."""

    def __init__(self, params: Sequence[nn.Parameter], ranks, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.ranks = ranks
        self.buckets: list[list[Tensor]] = []
        self.launched_before_end = 0
        if ranks.world_size == 1:
            return
        size = bucket_bytes  # start a new bucket with the first parameter
        for p in reversed(list(params)):
            if size >= bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        for p in params:
            p.register_post_accumulate_grad_hook(self._ready)
        self.armed = False

    def start(self) -> None:
        """Arm the hooks for the next backward."""
        if not self.buckets:
            return
        self.missing = [len(bucket) for bucket in self.buckets]
        self.sent: list[tuple[Tensor, list[Tensor], "dist.Work"]] = []
        self.armed = True

    def _ready(self, param: Tensor) -> None:
        if not self.armed:
            return
        self.missing[self.bucket_of[id(param)]] -= 1
        while len(self.sent) < len(self.buckets) and self.missing[len(self.sent)] == 0:
            self._send(len(self.sent))

    def _send(self, index: int) -> None:
        grads = [p.grad for p in self.buckets[index] if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads]) if grads else torch.zeros(0)
        self.sent.append((flat, grads, dist.all_reduce(flat, async_op=True)))

    def finish(self) -> None:
        """Send the buckets still waiting, wait for every sum and write it into the gradients."""
        if not self.buckets:
            return
        self.armed = False
        self.launched_before_end = len(self.sent)
        while len(self.sent) < len(self.buckets):
            self._send(len(self.sent))
        for flat, grads, work in self.sent:
            work.wait()
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
