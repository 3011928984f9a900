"""Gradient accumulation under DistributedDataParallel without no_sync(): every micro-batch's backward all-reduces.

    ddp-accumulation-sync   several synchronised backward passes of one DistributedDataParallel model per optimizer
                            step: each all-reduces every gradient, though only the last one's result is needed
                            (ultralytics 8.4.62 trainer.py:459/485 accumulates this way)

Observes: outermost forwards of DistributedDataParallel modules in training with gradient synchronisation on (not
inside no_sync()), whose autograd graph a backward then reached; optimizer steps.
Judges: more than one such backward of the same DDP object between two optimizer steps. Silent on no_sync() for all
but the last micro-batch (what accelerate's accumulate() and the transformers Trainer do), and on one backward per
step.
Cost: measured: DDP's own average backward communication time (its logging data, sampled by DDP) times the extra
all-reduces per step, and its share of the step.
"""

from __future__ import annotations

from shims.detect import report
from shims.detect.detector import Detector

MEASURED_STEPS = 32  # steps per place whose DDP communication time is read (a dict built by DDP per read)


class _SyncedForward:
    __slots__ = ("ddp_id", "where", "ddp")

    def __init__(self, ddp_id, where, ddp):
        self.ddp_id, self.where, self.ddp = ddp_id, where, ddp


class DDPAccumulation(Detector):
    name = "ddp-accumulation"
    kinds = {"ddp-accumulation-sync": "gradient accumulation under DistributedDataParallel without no_sync(): "
                                      "every micro-batch's backward all-reduces"}
    docs = {  # its row of docs/detect.md's table (kind: what, count, cost, fix): python -m shims.detect.catalogue
        "ddp-accumulation-sync": (
            'more than one synchronised backward of the same `DistributedDataParallel` model between two optimizer '
            'steps (forwards in training outside `no_sync()` whose graph a backward reached): gradient accumulation '
            'where every micro-batch all-reduces (ultralytics 8.4.62 `trainer.py:459/485`); reported at the DDP '
            "model's forward line; silent with `no_sync()` for all but the last micro-batch (accelerate's "
            '`accumulate()`, the transformers Trainer) and on one backward per step',
            'optimizer steps',
            "measured: DDP's own average backward communication time (its logging data) times the extra all-reduces "
            'per step, and its share of the step',
            '`with model.no_sync():` around the forward and backward of every micro-batch but the last',
        ),
    }
    observes = "DistributedDataParallel forwards and optimizer steps"
    needs = ("node_prehooks", "step_hooks")

    def install(self):
        import weakref
        self._ddp_type = self.session.torch.nn.parallel.DistributedDataParallel
        self._weakref = weakref.ref
        self._backwards = {}  # DDP id -> [synchronised backwards since the last step, where, weakref to the DDP]
        self.session.on_forward(self, self.forward_done)
        self.session.on_step(self, self.step_done)

    def forward_done(self, call):
        module = call.module
        if not isinstance(module, self._ddp_type) or not module.training \
                or not getattr(module, "require_backward_grad_sync", True):
            return
        self.session.track_graph(self, call.nodes, _SyncedForward(id(module), call.where, self._weakref(module)),
                                 self.graph_freed)

    def graph_freed(self, forward, reached):
        if not reached:
            return
        entry = self._backwards.get(forward.ddp_id)
        if entry is None:
            entry = self._backwards[forward.ddp_id] = [0, forward.where, forward.ddp]
        entry[0] += 1
        entry[1] = forward.where or entry[1]

    def step_done(self, optimizer):
        for count, where, ddp_ref in self._backwards.values():
            if count < 2:
                continue
            found = self.session.finding("ddp-accumulation-sync", where)
            found.add()
            info = found.info
            info["extra"] = info.get("extra", 0) + count - 1
            info["micro"] = max(info.get("micro", 0), count)
            ddp = ddp_ref()
            if ddp is not None and found.count <= MEASURED_STEPS:
                comm_ns = _comm_ns(ddp)
                if comm_ns:
                    found.samples.append((count - 1) * comm_ns / 1e9)
        self._backwards.clear()

    def describe(self, finding):
        info, seconds, session = finding.info, finding.seconds(), self.session
        message = (f"{finding.count} optimizer step(s) of this DistributedDataParallel model ran up to "
                   f"{info.get('micro')} synchronised backward passes each ({info.get('extra')} all-reduces of every "
                   "gradient beyond one per step): gradient accumulation without no_sync()")
        if seconds is not None:
            cost = (f"{report.ms(seconds)} per step in the extra all-reduces (measured: DDP's average backward "
                    f"communication time x extra all-reduces){session.share(seconds)}")
        else:
            cost = "one all-reduce of every gradient per extra micro-batch (DDP reported no communication time)"
        fix = ("run every micro-batch but the last of each step under `with model.no_sync():` (forward and "
               "backward), so only the last backward all-reduces; the accumulated gradients are the same sum (up to "
               "rounding across ranks)")
        return message, cost, fix


def _comm_ns(ddp):
    """DDP's average backward communication time in ns (its logging data), or None."""
    try:
        return ddp._get_ddp_logging_data().get("avg_backward_comm_time") or None
    except Exception:  # noqa: BLE001 - a torch without the logging data: no measured cost
        return None


DETECTOR = DDPAccumulation
