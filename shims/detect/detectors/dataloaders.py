"""DataLoaders that make accelerator training wait.

    dataloader-workers      num_workers=0 while waiting for a batch takes 5% of the optimizer step or more
    dataloader-pin-memory   pin_memory=False while the batches are host tensors fed to accelerator training

Watches: DataLoader.__init__ (its settings, its call site), DataLoader.__iter__ and the iterator's __next__ (time
waiting for each batch, whether batches hold host tensors); the device being trained on (session.accelerator).
Judges: at the end of the run, only when a module was trained on an accelerator (on CPU there is nothing to feed).
Cost: measured wait per batch and its share of the step; for pinning, an estimate.
"""

from __future__ import annotations

import weakref
from time import perf_counter

from shims.detect import report, sites, tensors
from shims.detect.detector import Detector

LOADER_WAIT_SHARE = 0.05  # num_workers=0 is reported when waiting for data takes at least this share of a step


class _LoaderInfo:
    __slots__ = ("where", "num_workers", "pin_memory", "batches", "wait", "host_batches")

    def __init__(self, where, num_workers, pin_memory):
        self.where, self.num_workers, self.pin_memory = where, num_workers, pin_memory
        self.batches, self.wait, self.host_batches = 0, 0.0, None


class DataLoaders(Detector):
    name = "dataloaders"
    kinds = {
        "dataloader-workers": "num_workers=0 while accelerator training waits for data",
        "dataloader-pin-memory": "pin_memory=False while host batches feed accelerator training",
    }
    docs = {  # its rows of docs/detect.md's table (kind: what, count, cost, fix): python -m shims.detect.catalogue
        'dataloader-workers': (
            'a `DataLoader(num_workers=0)` whose batches feed training on an accelerator, while waiting for a batch '
            'takes 5% of the step or more',
            'batches',
            'measured wait per batch and its share of the step',
            '`num_workers >= 2`',
        ),
        'dataloader-pin-memory': (
            'a `DataLoader` without `pin_memory` yielding host tensors to training on an accelerator',
            'batches',
            'estimated (pageable host-to-device copies cannot overlap compute)',
            '`pin_memory=True` and `.to(device, non_blocking=True)`',
        ),
    }
    observes = "DataLoaders"
    needs = ("step_hooks",)

    def install(self):
        from torch.utils.data import dataloader
        self._loaders = weakref.WeakKeyDictionary()  # DataLoader -> _LoaderInfo
        self._infos = []  # every _LoaderInfo, judged at the end even when its DataLoader is gone
        self._iterators = weakref.WeakKeyDictionary()  # DataLoader iterator -> _LoaderInfo
        wrap = self.session.wrap
        wrap(dataloader.DataLoader, "__init__", sites.after_construction(self, self._remember_loader))
        wrap(dataloader.DataLoader, "__iter__", self._iter_wrapper)
        wrap(dataloader._BaseDataLoaderIter, "__next__", self._next_wrapper)

    def _remember_loader(self, loader, where):
        info = _LoaderInfo(where, getattr(loader, "num_workers", None), bool(getattr(loader, "pin_memory", False)))
        self._loaders[loader] = info
        self._infos.append(info)

    def _iter_wrapper(self, original):
        detector = self

        def __iter__(self):
            iterator = original(self)
            if detector.on:
                info = detector._loaders.get(self)
                if info is not None:
                    try:
                        detector._iterators[iterator] = info
                    except TypeError:  # an iterator that cannot be weakly referenced: not timed
                        pass
            return iterator
        return __iter__

    def _next_wrapper(self, original):
        detector = self

        def __next__(self):
            info = detector._iterators.get(self) if detector.on else None
            if info is None:
                return original(self)
            start = perf_counter()
            batch = original(self)
            info.wait += perf_counter() - start
            info.batches += 1
            if info.host_batches is None:
                info.host_batches = tensors.has_host_tensor(detector.session.torch.Tensor, batch)
            return batch
        return __next__

    def finish(self):
        session = self.session
        if session.accelerator is None:
            return
        step = session.step_seconds()
        for info in self._infos:
            if not info.batches:
                continue
            wait = info.wait / info.batches
            if info.num_workers == 0 and step and wait >= LOADER_WAIT_SHARE * step:
                found = session.finding("dataloader-workers", info.where)
                found.count = info.batches
                found.info.update(wait=wait, step=step)
            if not info.pin_memory and info.host_batches:
                session.finding("dataloader-pin-memory", info.where).count = info.batches

    def describe(self, finding):
        device, info = self.session.accelerator, finding.info
        if finding.kind == "dataloader-workers":
            message = ("DataLoader with num_workers=0: batches are loaded in the training process, between steps, "
                       f"while the {device} waits")
            cost = (f"{report.ms(info['wait'])} waiting for each batch (measured), "
                    f"{100 * info['wait'] / info['step']:.0f}% of the {report.ms(info['step'])} median step")
            return message, cost, "DataLoader(..., num_workers=N) with N >= 2 (and persistent_workers=True)"
        message = (f"DataLoader without pin_memory feeds host batches to training on the {device}: copies come from "
                   "pageable memory")
        cost = ("estimated: host-to-device copies from pageable memory are staged and synchronous; "
                ".to(device, non_blocking=True) cannot overlap them with compute")
        return message, cost, "DataLoader(..., pin_memory=True), and .to(device, non_blocking=True) on the batches"


DETECTOR = DataLoaders
