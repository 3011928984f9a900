"""Whether a backward ever reached an autograd graph, known cheaply and soundly, and what such a graph holds.

`track(owner, nodes, item, callback)`: one small callable is registered as a pre-hook on each of the graph's output
nodes; autograd calls it when a backward (or autograd.grad) passes through. A weak reference to that callable dies when
autograd frees those nodes, i.e. when the outputs are dropped; its callback only queues it (no locks, no receipt:
it runs inside the garbage collector). The session hands queued tracked graphs to `callback(item, reached)` at its next
safe point (after a forward, after an optimizer step, at flush); graphs still alive at the end are taken by their
owner with `take_alive(owner)`.
"""

from __future__ import annotations

import weakref
from collections import deque

GRAPH_WALK_LIMIT = 20000  # autograd nodes visited to measure the activations a graph saves


class _Reached:
    """Registered as a pre-hook on a graph's output nodes: autograd calls it when a backward gets there."""

    __slots__ = ("flag", "__weakref__")

    def __init__(self, flag):
        self.flag = flag  # [reached]: outlives this object (the tracked keeps it), which must die with the graph

    def __call__(self, grad_outputs):
        self.flag[0] = True


class _Tracked(weakref.ref):
    """Dies with the graph's output nodes."""

    __slots__ = ("owner", "item", "callback", "state")


class GraphTracker:
    def __init__(self):
        self._alive = {}  # id(tracked) -> _Tracked whose graph is alive
        self._gone = deque()  # tracked graphs whose graph was freed (appended from GC callbacks)

    def track(self, owner, nodes, item, callback):
        flag = [False]
        reached = _Reached(flag)
        for node in nodes:
            node.register_prehook(reached)
        tracked = _Tracked(reached, self._gone.append)
        tracked.owner, tracked.item, tracked.callback, tracked.state = owner, item, callback, flag
        self._alive[id(tracked)] = tracked

    def pending(self):
        return bool(self._gone)

    def freed(self):
        """(owner, callback, item, reached) of every graph freed since the last call."""
        gone = self._gone
        while gone:
            tracked = gone.popleft()
            self._alive.pop(id(tracked), None)
            yield tracked.owner, tracked.callback, tracked.item, tracked.state[0]

    def take_alive(self, owner):
        """The (item, reached) of `owner`'s graphs still alive, forgotten here (the end of a run)."""
        taken = []
        for key, tracked in list(self._alive.items()):
            if tracked.owner is owner and tracked() is not None:
                del self._alive[key]
                taken.append((tracked.item, tracked.state[0]))
        return taken

    def clear(self):
        self._alive.clear()


def saved_activation_bytes(roots, own_storages, seen_storages=None):
    """Bytes of the tensors an autograd graph saves for backward, the storages in `own_storages` (a module's
    parameters and buffers) excluded; `seen_storages` (a set) collects the storages counted. Saved tensors with unpack
    hooks (checkpointing, offloading) are not opened: opening them could run user code."""
    seen_nodes, total = {}, 0
    seen_storages = set() if seen_storages is None else seen_storages
    stack = list(roots)
    attributes = {}
    while stack and len(seen_nodes) < GRAPH_WALK_LIMIT:
        node = stack.pop()
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes[id(node)] = node
        names = attributes.get(type(node))
        if names is None:
            names = attributes[type(node)] = [a for a in dir(node) if a.startswith("_raw_saved_")]
        for name in names:
            try:
                raw = getattr(node, name)
            except Exception:  # noqa: BLE001 - freed or not a tensor
                continue
            for saved in raw if isinstance(raw, (list, tuple)) else (raw,):
                if getattr(saved, "unpack_hook", None) is not None:
                    continue
                try:
                    storage = saved.data.untyped_storage()
                    key = storage.data_ptr()
                except Exception:  # noqa: BLE001
                    continue
                if key in own_storages or key in seen_storages:
                    continue
                seen_storages.add(key)
                total += storage.nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return total


def storages_of(module):
    """Storage pointers of a module's parameters and buffers."""
    own = set()
    for tensor in list(module.parameters()) + list(module.buffers()):
        try:
            own.add(tensor.untyped_storage().data_ptr())
        except Exception:  # noqa: BLE001 - a tensor without storage (meta, sparse)
            pass
    return own
