"""What the observe-only mode saw of the run, whatever it found: optimizer steps, forwards (training and evaluation),
backward passes, evaluations, the rank, and a timeline of the first events. The report's summary ("no findings" only
when training was observed) and the HTML timeline are built from it; the session writes it into the receipt record
"detect" as `observed`.

An evaluation is a run of outermost forwards in eval mode between two training events (a forward in train mode, a
backward or an optimizer step). Times are seconds since the session started (time.perf_counter).
"""

from __future__ import annotations

from time import perf_counter

TIMELINE_EVENTS = 600  # events kept for the timeline (the first ones of the run); the counts cover the whole run


class Observation:
    def __init__(self, torch=None):
        self.torch = torch
        self.rank = self.world_size = None  # read while training (a process group is often gone at exit)
        self.origin = perf_counter()
        self.steps = 0
        self.forwards_train = 0
        self.forwards_eval = 0
        self.backwards = 0
        self.evaluations = 0
        self._in_eval = False
        self.events = []  # [kind, start, end, where] with kind forward | eval-forward | backward | step
        self.dropped = 0
        self.step_started = None  # perf_counter() at the optimizer step pre-hook (None where torch has none)
        self.saves = 0  # torch.save calls (checkpoints)
        self.profile = None  # doctor --profile N: the window, the operators per step, the trace (profile.py)

    def forward(self, training, start, end, where_of):
        """An outermost forward ended. `where_of()` gives its call site (asked only while the timeline has room)."""
        if training:
            self.forwards_train += 1
            self._in_eval = False
        else:
            self.forwards_eval += 1
            if not self._in_eval:
                self.evaluations += 1
                self._in_eval = True
        self._add("forward" if training else "eval-forward", start, end, where_of)

    def backward(self, start, end, where_of):
        self.backwards += 1
        self._in_eval = False
        self._add("backward", start, end, where_of)

    def step(self, end):
        self.steps += 1
        if self.rank is None:
            self.rank, self.world_size = _rank(self.torch)
        self._in_eval = False
        start = self.step_started if self.step_started is not None else end
        self.step_started = None
        self._add("step", start, end, None)

    def _add(self, kind, start, end, where_of):
        if len(self.events) >= TIMELINE_EVENTS:
            self.dropped += 1
            return
        where = None
        if where_of is not None:
            try:
                where = where_of()
            except Exception:  # noqa: BLE001 - a place is a nicety of the timeline
                where = None
        self.events.append([kind, round(start - self.origin, 6), round(end - self.origin, 6), where])

    def as_dict(self, torch, step_seconds):
        """The receipt's `observed`: counts, the median optimizer step, the rank, the timeline."""
        rank, world = (self.rank, self.world_size) if self.rank is not None else _rank(torch)
        return {"optimizer_steps": self.steps, "forwards": self.forwards_train, "eval_forwards": self.forwards_eval,
                "evaluations": self.evaluations, "backwards": self.backwards, "step_seconds": step_seconds,
                "rank": rank, "world_size": world, "checkpoint_saves": self.saves, "profile": self.profile,
                "timeline": {"events": [list(e) for e in self.events], "dropped": self.dropped,
                             "fields": ["kind", "start", "end", "where"]}}


def _rank(torch):
    """(rank, world size) in an initialised process group, else (None, None)."""
    dist = getattr(torch, "distributed", None)
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # noqa: BLE001 - a process group being torn down
        pass
    return None, None
