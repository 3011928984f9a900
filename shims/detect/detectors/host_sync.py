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

from collections import deque

from shims.detect import report, tensors
from shims.detect.detector import SAMPLES, Detector

SYNC_MIN_STEPS = 3  # a host-sync site must appear in at least this many optimizer steps ...
SYNC_STEP_SHARE = 0.5  # ... and in at least this share of them ("per step", not an occasional log line)
READS = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__", "__repr__", "__format__")


class _Site:
    """The host reads at one place: judged at the end of the run (a finding only if they hit most steps)."""

    __slots__ = ("calls", "steps_hit", "last_step", "samples")

    def __init__(self):
        self.calls, self.steps_hit, self.last_step, self.samples = 0, 0, -1, deque(maxlen=SAMPLES)


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
        self._in_read = False  # a read inside a read (format -> item): counted once
        self._sites = {}  # where -> _Site
        for name in READS:
            self.session.intercept(self, self.session.torch.Tensor, name, self.timed_read,
                                   when=lambda tensor, *args, **kwargs: not self._in_read
                                   and tensors.on_accelerator(tensor))

    def timed_read(self, call):
        session = self.session
        where = session.sites.caller(call.frame)
        if where is None:
            return call.proceed()
        self._in_read = True
        try:
            result = call.proceed()
        finally:
            self._in_read = False
        site = self._sites.get(where)
        if site is None:
            site = self._sites[where] = _Site()
        site.calls += 1
        if site.last_step != session.steps:
            site.steps_hit += 1
            site.last_step = session.steps
        site.samples.append(call.seconds)
        return result

    def finish(self):
        steps = self.session.steps
        for where, site in self._sites.items():
            if steps and site.steps_hit >= SYNC_MIN_STEPS and site.steps_hit >= SYNC_STEP_SHARE * steps:
                found = self.session.finding("host-sync", where)
                found.count = site.calls
                found.samples = deque(site.samples, maxlen=SAMPLES)
                found.info["steps_hit"], found.info["steps"] = site.steps_hit, steps

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
