"""A ColossalAI-style bucketed ZeRO reducer, written here, shaped like LowLevelZeroOptimizer 0.3.1-0.3.6.

What it keeps from upstream (colossalai/zero/low_level/low_level_optim.py and bookkeeping/bucket_store.py, read in the
0.3.6 and 0.3.7 sdists): the method names the colossalai patch keys on (`_attach_reduction_hook`, `_grad_handler(self,
param, group_id, grad)`, `_add_to_bucket`, `num_param_groups`, `_working_param_groups`, `zero_grad`, `_bucket_store`,
`dp_pg`), and the behaviour that matters for #5601:
  - the hook (a tensor hook, `param.register_hook`) appends the parameter to a bucket and adds its size, unless
    inside `no_sync()`; when the next parameter would overflow the bucket, or belongs to another group, the bucket is
    flushed first;
  - a flush reads each queued parameter's `.grad` (a `None` there fails), pads and splits it per rank, sets
    `.grad = None`, divides by the world size, all-reduces the flat buffer, and adds the result to a gradient store
    (a parameter reduced twice in one step is summed, as upstream's `_add_grad` does);
  - `backward(loss)` runs `loss.backward()`, flushes what is left, then `zero_grad()`; `step()` hands the stored
    gradients to the inner optimizer.
What it leaves out: the optimizer-state sharding (each rank keeps full parameters), mixed precision, overflow checks,
CUDA streams. None of them touches the hooks. Works without torch.distributed (world size 1) for in-process tests.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist


def _world(group):
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group=group), dist.get_rank(group=group)
    return 1, 0


class BucketStore:
    """Parameters queued for reduction, and their gradient slices per rank once a flush builds them."""

    def __init__(self, torch_pg):
        self._world_size, self._local_rank = _world(torch_pg)
        self.current_group_id = 0
        self._num_elements_in_bucket = 0
        self._param_list = []
        self._padding_size = []
        self._grad_in_bucket = {rank: [] for rank in range(self._world_size)}

    def num_elements_in_bucket(self):
        return self._num_elements_in_bucket

    def reset_num_elements_in_bucket(self):
        self._num_elements_in_bucket = 0

    def add_param_grad(self, group_id, param, padding_size):
        self._param_list.append(param)
        self._padding_size.append(padding_size)
        self._num_elements_in_bucket += param.numel() + padding_size
        self.current_group_id = group_id

    def build_grad_in_bucket(self):
        """Take each queued parameter's gradient (fails on None, as upstream does), split it per rank."""
        for param, padding_size in zip(self._param_list, self._padding_size):
            flat = param.grad.detach().clone().flatten()
            if padding_size:
                flat = torch.nn.functional.pad(flat, [0, padding_size])
            for rank, piece in enumerate(flat.split(flat.numel() // self._world_size)):
                self._grad_in_bucket[rank].append(piece.clone())
            param.grad = None

    def get_grad(self):
        return self._grad_in_bucket

    def get_flatten_grad(self):
        return torch.cat([torch.cat(pieces) for pieces in self._grad_in_bucket.values()])

    def reset(self):
        self._param_list, self._padding_size = [], []
        self._grad_in_bucket = {rank: [] for rank in range(self._world_size)}


class LowLevelZeroOptimizer:
    """ZeRO-2-style: gradients reduced in buckets during backward by hooks (partition_grad or overlap_communication).

    `queued_for_reduction` counts parameters flushed (one per parameter per backward when the hooks are right);
    `flushes` counts all-reduce calls.
    """

    def __init__(self, optimizer, reduce_bucket_size=1024 * 1024, overlap_communication=False, partition_grad=False,
                 dp_process_group=None):
        self.optim = optimizer
        self.dp_pg = dp_process_group
        self._world_size, self._local_rank = _world(dp_process_group)
        self.require_grad_sync = True
        self._reduce_bucket_size = reduce_bucket_size
        self._overlap_communication = overlap_communication
        self._partition_grads = partition_grad
        self._working_param_groups = {}
        self._padding = {}
        for group_id, group in enumerate(self.optim.param_groups):
            self._working_param_groups[group_id] = [p for p in group["params"] if p.requires_grad]
            for p in self._working_param_groups[group_id]:
                self._padding[p] = (self._world_size - p.numel() % self._world_size) % self._world_size
        self._bucket_store = BucketStore(self.dp_pg)
        self._grad_store = {}  # param -> reduced gradient (full, unpadded) for this step
        self.queued_for_reduction = 0
        self.flushes = 0
        if self._overlap_communication or self._partition_grads:
            self._attach_reduction_hook()

    @property
    def num_param_groups(self):
        return len(self._working_param_groups)

    # ------------------------------------------------------------ hooks (what the colossalai patch replaces)

    def _grad_handler(self, param, group_id, grad):
        # inside no_sync() gradients only accumulate; the synced backward queues them
        if self.require_grad_sync:
            self._add_to_bucket(param, group_id)
        return grad

    def _attach_reduction_hook(self):
        for group_id in range(self.num_param_groups):
            for param in self._working_param_groups[group_id]:
                if param.requires_grad:
                    param.register_hook(partial(self._grad_handler, param, group_id))

    # ------------------------------------------------------------ reduction

    def _add_to_bucket(self, param, group_id):
        store = self._bucket_store
        if (store.num_elements_in_bucket() + param.numel() > self._reduce_bucket_size
                or group_id != store.current_group_id):
            self._run_reduction()
        store.add_param_grad(group_id, param, self._padding[param])

    def _run_reduction(self):
        store = self._bucket_store
        if store.num_elements_in_bucket() == 0:
            return
        store.build_grad_in_bucket()
        flat = store.get_flatten_grad()
        flat /= self._world_size
        store.reset_num_elements_in_bucket()
        if self._world_size > 1:
            dist.all_reduce(flat, group=self.dp_pg)
        self.flushes += 1
        # the flat buffer is [rank 0's slice of each queued gradient..., rank 1's...]: reassemble each gradient
        per_rank = flat.split(flat.numel() // self._world_size)
        offset = 0
        for param, piece in zip(store._param_list, store.get_grad()[0]):
            size = piece.numel()
            full = torch.cat([reduced[offset:offset + size] for reduced in per_rank])
            self._add_grad(param, full[:param.numel()].view_as(param))
            self.queued_for_reduction += 1
            offset += size
        store.reset()

    def _add_grad(self, param, grad):
        if param in self._grad_store:
            self._grad_store[param] = self._grad_store[param] + grad
        else:
            self._grad_store[param] = grad.clone()

    # ------------------------------------------------------------ torch.optim.Optimizer-like methods

    def backward(self, loss, retain_graph=False):
        loss.backward(retain_graph=retain_graph)
        if not self.require_grad_sync:
            return
        if self._overlap_communication or self._partition_grads:
            self._run_reduction()
        else:
            self.sync_grad()
        self.zero_grad()

    def sync_grad(self):
        """Stage 1 without overlap: no hooks; queue every parameter that has a gradient, then flush."""
        for group_id in range(self.num_param_groups):
            for param in self._working_param_groups[group_id]:
                if param.grad is not None:
                    self._add_to_bucket(param, group_id)
        self._run_reduction()

    def zero_grad(self, set_to_none=True):
        for group in self._working_param_groups.values():
            for param in group:
                if set_to_none:
                    param.grad = None
                elif param.grad is not None:
                    param.grad.detach_()
                    param.grad.zero_()

    def step(self):
        if not self.require_grad_sync:
            return
        for group in self._working_param_groups.values():
            for param in group:
                param.grad = self._grad_store.get(param)
        self.optim.step()
        for group in self._working_param_groups.values():
            for param in group:
                param.grad = None
        self._grad_store = {}

    @contextmanager
    def no_sync(self):
        previous, self.require_grad_sync = self.require_grad_sync, False
        try:
            yield
        finally:
            self.require_grad_sync = previous
