"""A Gemini-style data-parallel wrapper, written here, shaped like ColossalAI's GeminiDDP (0.4.x-0.5.0).

What it keeps from upstream (colossalai/zero/gemini/gemini_ddp.py, read in the 0.3.6, 0.4.0 and 0.5.0 sdists): the
gradient hook is a staticmethod `GeminiDDP.grad_handle(grad, ..., p)` registered in `__init__` as a tensor hook,
`p._grad_handle = p.register_hook(partial(GeminiDDP.grad_handle, ..., p=p))`, and it does the whole reduction itself:
  - it marks the parameter reduced and builds an empty tensor whose storage is freed (returned as the "gradient", so
    `.grad` never holds memory);
  - it refuses a parameter whose chunk state is not HOLD_AFTER_BWD ("failed at the gradient reduction"): upstream's
    parameter op hooks move a parameter to that state only inside GeminiDDP.backward;
  - it copies the gradient into the chunk, and when every parameter of the chunk is in, all-reduces the chunk and
    divides by the world size; the parameter goes back to HOLD.
`backward(loss)` prepares the states, runs `loss.backward()`, checks every parameter was reduced and sets `.grad` to
None. `GeminiOptimizer.step()` hands the chunk's gradients to the inner optimizer.
What it leaves out: memory placement (chunks move between devices), fp16, one chunk only. Works without
torch.distributed (world size 1) for in-process tests.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import nn

HOLD, HOLD_AFTER_BWD, READY_FOR_REDUCE = "HOLD", "HOLD_AFTER_BWD", "READY_FOR_REDUCE"


def _world(group):
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group=group)
    return 1


def free_storage(tensor):
    """Release a tensor's memory but keep its shape (upstream's gemini utility of the same name)."""
    if tensor.untyped_storage().size() > 0:
        tensor.untyped_storage().resize_(0)


class Chunk:
    """One flat gradient buffer for a list of parameters, with a state per parameter."""

    def __init__(self, params, process_group):
        self.params = list(params)
        self.pg = process_group
        self.pg_size = _world(process_group)
        self.offsets, offset = {}, 0
        for p in self.params:
            self.offsets[p] = offset
            offset += p.numel()
        self.grad = torch.zeros(offset)
        self.state = {p: HOLD for p in self.params}

    def copy_grad(self, p, grad):
        start = self.offsets[p]
        self.grad[start:start + p.numel()].copy_(grad.detach().reshape(-1))
        self.state[p] = READY_FOR_REDUCE

    def grad_of(self, p):
        start = self.offsets[p]
        return self.grad[start:start + p.numel()].view_as(p)


class ChunkManager:
    def __init__(self, chunk):
        self.chunk = chunk
        self.reductions = 0  # all-reduce calls (one per backward when every hook fires once)
        self.params_reduced = 0  # hook calls that reached the chunk

    def get_chunk(self, p):
        return self.chunk

    def reduce_chunk(self, chunk):
        if any(state != READY_FOR_REDUCE for state in chunk.state.values()):
            return False
        if chunk.pg_size > 1:
            dist.all_reduce(chunk.grad, group=chunk.pg)
        chunk.grad.div_(chunk.pg_size)
        for p in chunk.params:
            chunk.state[p] = HOLD
        self.reductions += 1
        return True


class GeminiDDP(nn.Module):
    def __init__(self, module, process_group=None):
        super().__init__()
        self.module = module
        params = [p for p in module.parameters() if p.requires_grad]
        self.param2name = {p: name for name, p in module.named_parameters()}
        self.chunk_manager = ChunkManager(Chunk(params, process_group))
        for p in params:
            assert not hasattr(p, "_grad_handle")
            p._grad_handle = p.register_hook(
                partial(GeminiDDP.grad_handle, chunk_manager=self.chunk_manager, param2name=self.param2name, p=p))

    def remove_hooks(self):
        for p in self.chunk_manager.chunk.params:
            p._grad_handle.remove()
            delattr(p, "_grad_handle")

    @staticmethod
    def grad_handle(grad, chunk_manager, param2name, p):
        setattr(p, "_gemini_reduced", True)
        empty_grad = torch.empty_like(grad)
        free_storage(empty_grad)
        chunk = chunk_manager.get_chunk(p)
        if chunk.state[p] != HOLD_AFTER_BWD:
            raise RuntimeError(f"Parameter `{param2name[p]}` failed at the gradient reduction. "
                               "Some unsupported torch function is operated upon this parameter.")
        chunk.copy_grad(p, grad)
        chunk_manager.params_reduced += 1
        chunk_manager.reduce_chunk(chunk)
        return empty_grad

    def forward(self, *args, **kwargs):
        self.module.zero_grad(set_to_none=True)
        return self.module(*args, **kwargs)

    def backward(self, loss):
        chunk = self.chunk_manager.chunk
        for p in chunk.params:
            setattr(p, "_gemini_reduced", False)
            chunk.state[p] = HOLD_AFTER_BWD  # upstream's op hooks do this per operator during backward
        loss.backward()
        missing = [self.param2name[p] for p in chunk.params if not getattr(p, "_gemini_reduced")]
        if missing or any(state != HOLD for state in chunk.state.values()):
            raise RuntimeError(f"ZERO DDP error: the synchronization of gradients doesn't exit properly: {missing}")
        for p in chunk.params:
            p.grad = None


class GeminiOptimizer:
    def __init__(self, optimizer, ddp):
        self.optim, self.ddp = optimizer, ddp

    def backward(self, loss):
        self.ddp.backward(loss)

    def step(self):
        chunk = self.ddp.chunk_manager.chunk
        for p in chunk.params:
            p.grad = chunk.grad_of(p).clone()
        self.optim.step()
        for p in chunk.params:
            p.grad = None
        chunk.grad.zero_()
