"""The same host data copied to the device again and again, while all of it would fit in device memory.

    data-copied-every-epoch   .to(device) / .cuda() of host tensors holding the same data as an earlier copy (the
                              same tensor or a view of the same living host tensor, same place, shape and dtype, not
                              modified since), or of the batches of a DataLoader over a TensorDataset of host tensors
                              iterated again: at least 2 rounds, the data at most half the device's free memory

Watches: Tensor.to and Tensor.cuda called by user (or framework) code on host tensors, whose result is on an
accelerator (timed); DataLoader.__iter__ / the iterator's __next__ for loaders over a TensorDataset of host tensors.
Judges: at the end of the run, per call site. Silent when each copy is new data (fresh batches, a host tensor changed
in place between copies), when the data would not fit (or the free memory cannot be asked), on the CPU.
Cost: the measured time of those calls per round (host time: an asynchronous copy from pinned memory takes longer
on the device than measured), and an estimate from the bytes at COPY_BANDWIDTH.
"""

from __future__ import annotations

import sys
import weakref
from time import perf_counter

from shims.detect import devices, report, tensors
from shims.detect.detector import Detector

FIT_SHARE = 0.5  # reported when the repeated data takes at most this share of the device's free memory
COPY_BANDWIDTH = 12e9  # bytes/s: a host-to-device rate of pinned memory on PCIe 3.0 x16 (pageable is slower)
KEYS_PER_SITE = 4096  # distinct host tensors followed per call site


class _Site:
    """What one .to/.cuda call site copied: per data key [living host tensor (weak), its version, copies, bytes]."""

    __slots__ = ("keys", "seconds", "device", "loader_rounds", "loader_bytes", "loader_where", "loader_data")

    def __init__(self):
        self.keys, self.seconds, self.device = {}, 0.0, None
        self.loader_rounds, self.loader_bytes = {}, 0  # TensorDataset loader: round -> bytes copied in that round
        self.loader_where = self.loader_data = None


class _Loader:
    __slots__ = ("where", "rounds", "data_bytes")

    def __init__(self, where, data_bytes):
        self.where, self.rounds, self.data_bytes = where, 0, data_bytes


class DeviceCopies(Detector):
    name = "device-copies"
    kinds = {"data-copied-every-epoch": "the same host data copied to the device every epoch although all of it "
                                        "would fit in device memory"}
    docs = {  # its rows of docs/detect.md's table (kind: what, count, cost, fix): python -m shims.detect.catalogue
        'data-copied-every-epoch': (
            '`.to(device)` / `.cuda()` of host tensors holding the same data as an earlier copy at that line (the '
            'same host tensor, or a view of the same living host tensor, same place, shape and dtype, not modified '
            'in place since), or of the batches of a `DataLoader` over a `TensorDataset` of host tensors iterated '
            'again (also when the loader is built anew each epoch), in 2 rounds or more, while that data takes at '
            "most half of the device's free memory; silent on fresh batches (a `Dataset` that builds its items, "
            'random tensors), on data changed in place between copies, on data that would not fit, on data moved to '
            'the device once, and on the CPU',
            'rounds (epochs) in which it was copied',
            'measured host time of those copy calls per round and per step (asynchronous copies from pinned memory '
            'take longer on the device than measured), and estimated transfer time at 12 GB/s (PCIe 3.0 x16, pinned)',
            'move the data set to the device once before the loop (`TensorDataset(x.to(device), y.to(device))`) and '
            'index it there',
        ),
    }
    observes = "host-to-device copies"

    def install(self):
        from torch.utils.data import TensorDataset, dataloader
        session = self.session
        self._tensor_dataset = TensorDataset
        self._tensor, self._strided = session.torch.Tensor, session.torch.strided  # sparse tensors have no data_ptr
        self._sites = {}  # where -> _Site
        self._free = {}  # torch.device -> free bytes (asked once, at the first repeated copy)
        self._loaders = weakref.WeakKeyDictionary()  # host TensorDataset iterated by a DataLoader -> _Loader
        self._iterators = weakref.WeakKeyDictionary()  # its iterator -> _Loader
        self._batch = {}  # id(tensor) -> (weakref to the tensor, _Loader): the latest batch of such a loader
        for name in ("to", "cuda"):
            session.wrap(session.torch.Tensor, name, self._copy_wrapper)
        session.wrap(dataloader.DataLoader, "__iter__", self._iter_wrapper)
        session.wrap(dataloader._BaseDataLoaderIter, "__next__", self._next_wrapper)

    # ------------------------------------------------------------------ copies

    def _copy_wrapper(self, original):
        detector = self

        def copy(self, *args, **kwargs):
            if not detector.on or not self.is_cpu:
                return original(self, *args, **kwargs)
            start = perf_counter()
            result = original(self, *args, **kwargs)
            seconds = perf_counter() - start
            try:
                if isinstance(result, detector._tensor) and self.layout is detector._strided \
                        and tensors.on_accelerator(result) and not detector.session.compiling():
                    detector.copied(self, result, seconds, sys._getframe(1))
            except Exception as exc:  # noqa: BLE001 - a detector never breaks the user's run
                detector.session.fail(detector, exc)
            return result
        return copy

    def copied(self, source, result, seconds, frame):
        where = self.session.sites.caller(frame)
        if where is None:
            return
        site = self._sites.get(where)
        if site is None:
            site = self._sites[where] = _Site()
        site.seconds += seconds
        site.device = result.device
        nbytes = source.numel() * source.element_size()
        batch = self._batch.get(id(source))
        if batch is not None and batch[0]() is source:
            loader = batch[1]
            site.loader_rounds[loader.rounds] = site.loader_rounds.get(loader.rounds, 0) + nbytes
            site.loader_where, site.loader_data = loader.where, loader.data_bytes
            if len(site.loader_rounds) == 2:
                self._ask_free(result.device)
            return
        base = source._base if source._base is not None else source
        key = (source.data_ptr(), tuple(source.shape), source.dtype)
        entry = site.keys.get(key)
        if entry is not None and entry[0]() is base and entry[1] == source._version:
            entry[2] += 1
            if entry[2] == 2:
                self._ask_free(result.device)
        elif entry is not None or len(site.keys) < KEYS_PER_SITE:
            # new data here (or the old host tensor is gone, or was changed in place): start counting again
            site.keys[key] = [weakref.ref(base), source._version, 1, nbytes]

    def _ask_free(self, device):
        if device not in self._free:
            self._free[device] = devices.free_memory(self.session.torch, device)

    # ------------------------------------------------------------------ DataLoaders over a TensorDataset

    def _iter_wrapper(self, original):
        detector = self

        def __iter__(self):
            iterator = original(self)
            if detector.on:
                try:
                    detector.loader_iterated(self, iterator, sys._getframe(1))
                except Exception as exc:  # noqa: BLE001
                    detector.session.fail(detector, exc)
            return iterator
        return __iter__

    def loader_iterated(self, loader, iterator, frame):
        dataset = getattr(loader, "dataset", None)
        if not isinstance(dataset, self._tensor_dataset):
            return
        info = self._loaders.get(dataset)  # by data set: a DataLoader built anew each epoch is the same data
        if info is None:
            if not dataset.tensors or not all(t.is_cpu for t in dataset.tensors):
                return
            where = self.session.where(frame)
            info = self._loaders[dataset] = _Loader(where, sum(t.numel() * t.element_size() for t in dataset.tensors))
        info.rounds += 1
        try:
            self._iterators[iterator] = info
        except TypeError:  # an iterator without weak references: its batches are not followed
            pass

    def _next_wrapper(self, original):
        detector = self

        def __next__(self):
            batch = original(self)
            info = detector._iterators.get(self) if detector.on else None
            if info is not None:
                torch = detector.session.torch
                detector._batch = {id(t): (weakref.ref(t), info)
                                   for t in tensors._walk(batch, torch.Tensor, limit=8, depth=2)}
            return batch
        return __next__

    # ------------------------------------------------------------------ judging

    def finish(self):
        for where, site in self._sites.items():
            free = self._free.get(site.device)
            if free is None:
                continue
            if len(site.loader_rounds) >= 2 and site.loader_data <= FIT_SHARE * free:
                rounds = len(site.loader_rounds)
                self._found(where, rounds, max(site.loader_rounds.values()), site.loader_data, free, site, rounds)
                continue
            repeated = [entry for entry in site.keys.values() if entry[2] >= 2]
            if not repeated:
                continue
            data = sum(entry[3] for entry in repeated)
            if data <= FIT_SHARE * free:
                rounds = max(entry[2] for entry in repeated)
                copies = sum(entry[2] for entry in site.keys.values())
                self._found(where, rounds, data, data, free, site, copies)

    def _found(self, where, rounds, per_round, data, free, site, copies):
        found = self.session.finding("data-copied-every-epoch", where)
        found.count = rounds
        found.info.update(per_round=per_round, data=data, free=free, seconds=site.seconds, copies=copies,
                          device=site.device, loader=site.loader_where if site.loader_rounds else None)

    def describe(self, finding):
        info, session = finding.info, self.session
        rounds, loader = finding.count, info["loader"]
        what = (f"batches of the DataLoader over a TensorDataset of host tensors iterated at {loader}" if loader
                else "the same host tensors")
        message = (f"{what} copied to {info['device']} here in {rounds} rounds ({report.size(info['per_round'])} per "
                   f"round), while all of it ({report.size(info['data'])}) would fit in the "
                   f"{report.size(info['free'])} free on the device")
        per_round = info["seconds"] / rounds
        steps = session.steps
        per_step = info["seconds"] / steps if steps else None
        cost = (f"{report.ms(per_round)} per round in these copy calls (measured host time"
                + (f", {report.ms(per_step)} per step{session.share(per_step)}" if per_step is not None else "")
                + f"); estimated {report.ms(info['per_round'] / COPY_BANDWIDTH)} per round of transfer at "
                f"{COPY_BANDWIDTH / 1e9:.0f} GB/s (PCIe 3.0 x16, pinned memory; pageable copies are slower and "
                "synchronous)")
        fix = ("move the data set to the device once, before the loop (TensorDataset(x.to(device), y.to(device)), "
               "or x_device = x.to(device) outside the epoch loop), and index or slice it there"
               if loader else "copy it to the device once, before the loop, and reuse the device tensor")
        return message, cost, fix


DETECTOR = DeviceCopies
