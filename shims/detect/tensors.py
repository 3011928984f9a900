"""What detect mode asks about tensors and modules, in one place (every detector uses the same answers).

`on_accelerator` is looked up through this module at each call (`tensors.on_accelerator(t)`), so tests can let CPU
tensors stand for accelerator tensors by replacing it here.
"""

from __future__ import annotations

OUTPUT_LIMIT = 16  # grad_fn nodes watched per forward (a forward's outputs are rarely more)


def on_accelerator(tensor):
    """Whether a tensor lives on an accelerator (a host read of it waits for the device). Tests replace this."""
    return not tensor.is_cpu and tensor.device.type != "meta"


def is_norm(module):
    """A normalisation layer: torch's (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm...) or a framework's own
    class named like one (FrozenBatchNorm2d, LayerNorm2d)."""
    return "norm" in type(module).__name__.lower()


def _walk(value, tensor_type, limit=32, depth=3):
    """The tensors in a value (tensors, lists, tuples, dicts; `depth` levels, `limit` items per container)."""
    stack = [(value, 0)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, tensor_type):
            yield value
        elif level < depth:
            if isinstance(value, (list, tuple)):
                stack.extend((v, level + 1) for v in value[:limit])
            elif isinstance(value, dict):
                stack.extend((v, level + 1) for v in list(value.values())[:limit])


def grad_fns(tensor_type, output):
    """The distinct grad_fn nodes of the tensors in a forward's output (at most OUTPUT_LIMIT)."""
    found, seen = [], set()
    for tensor in _walk(output, tensor_type):
        node = tensor.grad_fn
        if node is not None and id(node) not in seen:
            seen.add(id(node))
            found.append(node)
            if len(found) >= OUTPUT_LIMIT:
                break
    return found


def first_tensor(tensor_type, args, kwargs):
    """The first tensor a forward received (positional first, then keyword; one level into lists and dicts)."""
    for value in list(args) + (list(kwargs.values()) if kwargs else []):
        if isinstance(value, tensor_type):
            return value
        if isinstance(value, (list, tuple)):
            items = value[:8]
        elif isinstance(value, dict):
            items = list(value.values())[:8]
        else:
            continue
        for item in items:
            if isinstance(item, tensor_type):
                return item
    return None


def has_host_tensor(tensor_type, batch):
    """Whether a batch (tensors, lists, tuples, dicts; 3 levels) holds a tensor in host memory."""
    return any(tensor.is_cpu for tensor in _walk(batch, tensor_type))
