"""Forwards whose autograd graph no backward ever used.

    unused-forward   a forward (module in train mode, grad on) whose graph no backward reached, while the same module
                     ran another forward on the very same input tensor in that optimizer step (doctr #1861)
    eval-with-grad   a module in eval mode run with grad enabled, graph never used: an evaluation building graphs

Watches: each outermost forward with grad on (session.on_forward), its graph (session.track_graph), optimizer steps.
Judges: a freed graph never reached. A training forward waits for the end of its optimizer step, since a later forward
on the same input in that step makes it a duplicate; a lone unused training forward (a skipped batch) is no finding.
Cost: the measured forward time and its share of the step; for eval, the activations the graph saves (first call).
"""

from __future__ import annotations

import weakref

from shims.detect import report, tensors
from shims.detect.detector import Detector


class _Forward:
    """One outermost forward with grad on, waiting to learn whether a backward reaches its outputs.
    `repeats`: forwards of the same module on the very same input tensor in the same optimizer step (1 = alone)."""

    __slots__ = ("name", "training", "seconds", "where", "reached", "judged", "repeats", "group")

    def __init__(self, name, training, seconds, where):
        self.name, self.training, self.seconds, self.where = name, training, seconds, where
        self.reached, self.judged, self.repeats, self.group = False, False, 1, None


class _EvalGroup:
    """Eval-mode forwards of different modules made by one running frame, one after the other: the layers of one
    model run by a framework's loop (`for m in self.model: x = m(x)`, ultralytics' `_predict_once`) when the model's
    own forward was called directly, not through `model(...)`: one model forward, counted once.
    `constructing`: the class whose __init__ was running (a one-time probe at a model's construction)."""

    __slots__ = ("key", "modules", "seconds", "finding", "constructing", "closed")

    def __init__(self, key, constructing):
        self.key, self.modules, self.seconds, self.finding = key, set(), 0.0, None
        self.constructing, self.closed = constructing, False

    def counted(self, finding):
        """The first unused layer of this model forward was judged: one occurrence; its time once all ran."""
        finding.count += 1
        self.finding = finding
        if self.closed:
            finding.samples.append(self.seconds)

    def close(self):
        self.closed = True
        if self.finding is not None:
            self.finding.samples.append(self.seconds)


class Forwards(Detector):
    name = "forwards"
    kinds = {
        "unused-forward": "a forward whose autograd graph no backward used, beside another forward of the module in "
                          "the same optimizer step",
        "eval-with-grad": "a module in eval mode run with grad enabled; the graph it built was never used",
    }
    docs = {  # its rows of docs/detect.md's table (kind: what, count, cost, fix): python -m shims.detect.catalogue
        'unused-forward': (
            'a forward with grad, module in train mode, whose autograd graph no backward ever used, while the module '
            'ran another forward on the very same input tensor in that optimizer step (doctr #1861)',
            'unused forwards',
            'measured forward time, and its share of the median optimizer step',
            'delete the forward (doctr: the doctr patch, `SHIMS_MODE=fix`)',
        ),
        'eval-with-grad': (
            'a module in eval mode run with grad enabled whose graph no backward used: an evaluation building '
            'autograd graphs; the layers of one model run one after another from one line of one frame (`for m in '
            "self.model: x = m(x)`, when a framework calls the model's `forward` directly) count as one model "
            "forward; a forward while an `nn.Module`'s `__init__` runs (ultralytics' stride probe in "
            '`DetectionModel.__init__`) is marked one-time (per model built) and ranked below per-step costs',
            'model forwards',
            'activations saved for backward, measured on the first call at that line; forward time',
            '`torch.no_grad()` / `torch.inference_mode()` / `@torch.no_grad()`',
        ),
    }
    observes = "forwards"
    needs = ("node_prehooks", "graph_task_id", "step_hooks")

    def install(self):
        self._same_input = {}  # module id -> [(weakref to first input tensor, [_Forward...])] in this step
        self._waiting = []  # unused training forwards, judged when their optimizer step ends
        self._measured_saved = {}  # where -> bytes of activations an eval graph saves (first call measured)
        self._eval_group = None  # the _EvalGroup eval forwards are joining now
        self.session.on_forward(self, self.forward_done)
        self.session.on_step(self, self.step_done)

    def forward_done(self, call):
        module, session = call.module, self.session
        training = module.training
        name = type(getattr(module, "_orig_mod", module)).__name__  # a torch.compile'd module: the model's name
        forward = _Forward(name, training, call.seconds, call.where)
        if training:
            self._group_by_input(id(module), tensors.first_tensor(session.torch.Tensor, call.args, call.kwargs),
                                 forward)
        else:
            forward.group = self._join_eval_group(module, call)
            if forward.where not in self._measured_saved:
                self._measured_saved[forward.where] = session.saved_bytes(module, call.nodes)
        session.track_graph(self, call.nodes, forward, self.graph_freed)

    def _join_eval_group(self, module, call):
        frame = self.session.sites.user_frame(call._frame)
        key = (id(frame), getattr(frame, "f_code", None), call.where)  # one frame, one line: `x = m(x)` in a loop
        group = self._eval_group
        if group is None or group.key != key or id(module) in group.modules:
            if group is not None:
                group.close()
            group = self._eval_group = _EvalGroup(key, _constructing(frame, self.session.torch.nn.Module))
        group.modules.add(id(module))
        group.seconds += call.seconds
        return group

    def _group_by_input(self, module_id, tensor, forward):
        """Link forwards of one module on the very same input tensor object within one optimizer step (doctr's
        stray forward reuses `images`). Object identity, through a weak reference: a new batch is never matched."""
        if tensor is None:
            return
        groups = self._same_input.setdefault(module_id, [])
        for ref, forwards in groups:
            if ref() is tensor:
                forwards.append(forward)
                for linked in forwards:
                    linked.repeats = len(forwards)
                return
        if len(groups) > 16:  # no optimizer step for a while (a loop without one): forget dead inputs
            groups[:] = [group for group in groups if group[0]() is not None]
        try:
            groups.append((weakref.ref(tensor), [forward]))
        except TypeError:  # a tensor type without weak references: cannot be matched
            pass

    def graph_freed(self, forward, reached):
        forward.reached = reached
        if forward.training and not reached and not self.session.settling:
            self._waiting.append(forward)  # a later forward on its input in this step may still come
        else:
            self._judge(forward)

    def step_done(self, optimizer):
        if self._eval_group is not None:
            self._eval_group.close()
            self._eval_group = None
        while self._waiting:
            self._judge(self._waiting.pop())
        self._same_input.clear()  # a new optimizer step: forwards from now on are compared among themselves

    def finish(self):
        if self._eval_group is not None:
            self._eval_group.close()
        while self._waiting:
            self._judge(self._waiting.pop())
        for forward, reached in self.session.take_alive_graphs(self):
            forward.reached = reached
            self._judge(forward)

    def _judge(self, forward):
        if forward.reached or forward.judged:
            return
        forward.judged = True
        if not forward.training:
            group = forward.group
            if group is not None and group.finding is not None:
                return  # another layer of a model forward already counted
            found = self.session.finding("eval-with-grad", forward.where)
            if group is None:
                found.add(forward.seconds)
            else:
                group.counted(found)  # its time: the whole model forward
            found.info["name"] = forward.name if group is None or len(group.modules) < 2 else "a model"
            if group is not None and group.constructing:
                found.info["one_time"] = group.constructing
            return
        if forward.repeats < 2:
            return  # no other forward on this input in its step (a skipped batch, a metric pass): not a duplicate
        found = self.session.finding("unused-forward", forward.where)
        found.add(forward.seconds)
        found.info["name"] = forward.name
        found.info["forwards"] = max(forward.repeats, found.info.get("forwards", 0))

    def describe(self, finding):
        info, seconds, session = finding.info, finding.seconds(), self.session
        if finding.kind == "unused-forward":
            message = (f"{info['name']} forward here built an autograd graph that no backward used, while the "
                       f"module ran {info.get('forwards')} forwards with grad on this same input in that optimizer "
                       "step")
            cost = (f"{report.ms(seconds)} per occurrence (measured forward time){session.share(seconds)}; plus its "
                    "dropout draws and BatchNorm statistics updates, which change training")
            patch = session.patch_at(finding.where)
            fix = (f"delete the forward at line {_line(finding.where)} if its result is not needed; if only its value "
                   "is needed, reuse the output of the forward that is backpropagated, or run it under "
                   "torch.no_grad()")
            extra = {"alternative": f"the {patch} patch removes this forward: run with SHIMS_MODE=fix (the default)"}
            return message, cost, fix, (extra if patch else {})
        saved = self._measured_saved.get(finding.where)
        message = (f"{info['name']} in eval mode ran forward with grad enabled; the autograd graph it built was "
                   "never used by a backward")
        if info.get("one_time"):
            message += (f", during the construction of {info['one_time']} ({info['one_time']}.__init__): once per "
                        "model built, not per training step")
            cost = (f"one-time: forward {report.ms(seconds)} (median) per model built" if seconds is not None else
                    "one-time, per model built")
            fix = ("nothing to change in a training loop: a one-time cost of building the model (the framework "
                   f"could run this forward under torch.no_grad() in {info['one_time']}.__init__)")
            return message, cost, fix, {"bytes": saved or None}
        cost = (f"{report.size(saved)} of activations saved for backward per call (measured on the first call), "
                f"held until the outputs are dropped; forward {report.ms(seconds)} (median)") if saved is not None \
            else f"an autograd graph per call; forward {report.ms(seconds)} (median)"
        fix = (f"run the evaluation that reaches line {_line(finding.where)} under `with torch.no_grad():` or "
               "torch.inference_mode(), or decorate the evaluation function with @torch.no_grad() (as DETR-style "
               "evaluate functions do)")
        return message, cost, fix, {"bytes": saved or None}  # 0: this torch does not show saved tensors


def _constructing(frame, module_type):
    """The class of the nn.Module whose __init__ is running at or above `frame`, or None."""
    while frame is not None:
        if frame.f_code.co_name == "__init__":
            owner = frame.f_locals.get("self")
            if isinstance(owner, module_type):
                return type(owner).__name__
        frame = frame.f_back
    return None


def _line(where):
    return (where or "?").rpartition(":")[2]


DETECTOR = Forwards
