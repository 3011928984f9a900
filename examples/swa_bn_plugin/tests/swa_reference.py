"""The BatchNorm re-estimation pass of the SWA reference implementation, written here in its structure (reset the
statistics, momentum b / (n + b) so the running values become the cumulative average over the pass, one forward per
batch, momenta restored), twice: as the copies have it, and with the upstream fix (pytorch PR #52654: no_grad)."""

import torch


def _batchnorms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def bn_update(loader, model):
    """As the copies of the SWA reference code have it: gradients enabled during the pass."""
    layers = _batchnorms(model)
    if not layers:
        return
    model.train()
    momenta = {layer: layer.momentum for layer in layers}
    for layer in layers:
        layer.reset_running_stats()
    seen = 0
    for images, _ in loader:
        size = images.size(0)
        for layer in layers:
            layer.momentum = size / (seen + size)
        model(images)
        seen += size
    for layer, momentum in momenta.items():
        layer.momentum = momentum


@torch.no_grad()
def bn_update_fixed(loader, model):
    """The same pass with the upstream fix: no autograd graph is built."""
    layers = _batchnorms(model)
    if not layers:
        return
    model.train()
    momenta = {layer: layer.momentum for layer in layers}
    for layer in layers:
        layer.reset_running_stats()
    seen = 0
    for images, _ in loader:
        size = images.size(0)
        for layer in layers:
            layer.momentum = size / (seen + size)
        model(images)
        seen += size
    for layer, momentum in momenta.items():
        layer.momentum = momentum
