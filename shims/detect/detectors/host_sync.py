"""Host reads of accelerator tensors in most optimizer steps.

    host-sync   .item() / .cpu() / .tolist() / float() / int() / bool() / print / format of an accelerator tensor,
                called directly by user (or framework) code in at least half of the optimizer steps (3 at least)

Watches: those Tensor methods, wrapped with plain functions (not wrapt proxies: torch.compile traces Tensor methods
and must see ordinary Python functions). Reads made inside torch (GradScaler's own check) are not counted, nor reads
while dynamo traces.
Judges: at the end of the run, per call site: the share of optimizer steps with a read there. An occasional log line
is no finding.
Cost: the measured time blocked per call, per step, and its share of the step.
"""

from __future__ import annotations

import sys
from collections import deque
from time import perf_counter

from shims.detect import report, tensors
from shims.detect.detector import SAMPLES, Detector

SYNC_MIN_STEPS = 3  # a host-sync site must appear in at least this many optimizer steps ...
SYNC_STEP_SHARE = 0.5  # ... and in at least this share of them ("per step", not an occasional log line)
READS = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__", "__repr__", "__format__")


class HostSync(Detector):
    name = "host-sync"
    kinds = {"host-sync": "a host read of an accelerator tensor (.item(), .cpu(), printing...) in most training steps"}
    docs = {  # its rows of docs/detect.md's table (kind: what, count, cost, fix): python -m shims.detect.catalogue
        'host-sync': (
            '`.item()`, `.cpu()`, `.tolist()`, `float()`, `int()`, `bool()`, `print`/`format` of an accelerator '
            'tensor, called directly by your code in at least half of the optimizer steps (3 at least)',
            'calls',
            'measured time blocked per call, per step, and share of the step',
            'keep values on the device, read them every N steps',
        ),
    }
    observes = "host reads of tensors"
    needs = ("step_hooks",)

    def install(self):
        self._in_read = False
        self._sites = {}  # where -> [calls, steps hit, last step, seconds samples]
        for name in READS:
            self.session.wrap(self.session.torch.Tensor, name, self._read_wrapper)

    def _read_wrapper(self, original):
        detector = self

        def host_read(self, *args, **kwargs):
            if detector.on and not detector._in_read and tensors.on_accelerator(self):
                return detector.timed_read(original, self, args, kwargs, sys._getframe(1))
            return original(self, *args, **kwargs)
        return host_read

    def timed_read(self, original, tensor, args, kwargs, frame):
        session = self.session
        where = None if session.compiling() else session.sites.caller(frame)
        if where is None:
            return original(tensor, *args, **kwargs)
        self._in_read = True
        try:
            start = perf_counter()
            result = original(tensor, *args, **kwargs)
            seconds = perf_counter() - start
        finally:
            self._in_read = False
        site = self._sites.get(where)
        if site is None:
            site = self._sites[where] = [0, 0, -1, deque(maxlen=SAMPLES)]
        site[0] += 1
        if site[2] != session.steps:
            site[1] += 1
            site[2] = session.steps
        site[3].append(seconds)
        return result

    def finish(self):
        steps = self.session.steps
        for where, (calls, hit, _, samples) in self._sites.items():
            if steps and hit >= SYNC_MIN_STEPS and hit >= SYNC_STEP_SHARE * steps:
                found = self.session.finding("host-sync", where)
                found.count = calls
                found.samples = deque(samples, maxlen=SAMPLES)
                found.info["steps_hit"], found.info["steps"] = hit, steps

    def describe(self, finding):
        seconds, session = finding.seconds(), self.session
        steps_hit, steps = finding.info.get("steps_hit", 0), finding.info.get("steps", 0)
        message = (f"a host read of an accelerator tensor here ({finding.count} calls, in {steps_hit} of {steps} "
                   "optimizer steps): each waits for the device to finish the queued work")
        per_step = seconds * finding.count / steps if seconds is not None and steps else None
        cost = (f"{report.ms(seconds)} blocked per call (measured), about {report.ms(per_step)} per step"
                f"{session.share(per_step)}; the device also idles while the host catches up") \
            if per_step is not None else "one device synchronisation per call"
        fix = ("keep running values on the device (total += loss.detach()) and read them every N steps or at the "
               "end of the epoch; log and print tensors less often")
        return message, cost, fix


DETECTOR = HostSync
