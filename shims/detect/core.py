"""The core of the observe-only mode: what every detector shares, written once (a detector declares itself with
shims.detect.detector.Detector).

    Session     one per process: installs the detectors it is given and reverts them; owns
                - the events: every module call, each outermost forward with grad on that built a graph (with its
                  time and call site), each optimizer step; the global hooks behind them are registered once;
                - the optimizer-step clock (steps seen, median step interval) and the device being trained on;
                - call-site attribution (sites.py), graph tracking (graphs.py), the torch APIs (compat.py);
                - wrapping attributes with plain functions, and putting every one back on revert;
                - aggregation of findings by (kind, place), their cost units, writing them into the receipt record
                  "detect" at safe points (after a forward, after an optimizer step, at flush; never from a GC
                  callback), and the table at exit;
                - failures: a detector that raises is switched off and named in the receipt; the user's run goes on
                  (SHIMS_STRICT=1 raises instead).
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from collections import deque
from time import perf_counter

from shims.detect import report, tensors
from shims.detect.compat import TorchAPI
from shims.detect.detector import Finding
from shims.detect.graphs import GraphTracker, saved_activation_bytes, storages_of
from shims.detect.observed import Observation
from shims.detect.sites import CallSites

RECORD = "detect"
SUMMARY = "generic detectors of the observe-only mode (SHIMS_MODE=detect, python -m shims doctor)"
DOCS = "docs/detect.md"
TARGET = "torch:detectors"  # the receipt target of the core; a detector's own is TARGET.<name>

PUBLISH_EVERY = 1.0  # seconds between two writes of the findings into the receipt during a run
STEP_SAMPLES = 256  # optimizer step intervals kept per optimizer


_UNSET = object()


class ForwardCall:
    """An outermost forward, grad on, not run by autograd itself, that built an autograd graph: what `on_forward`
    listeners get. Valid during the call only (keep what you need, not the object: it holds a frame)."""

    __slots__ = ("module", "args", "kwargs", "output", "nodes", "seconds", "_frame", "_sites", "_where")

    def __init__(self, module, args, kwargs, output, nodes, seconds, frame, sites):
        self.module, self.args, self.kwargs, self.output = module, args, kwargs, output
        self.nodes, self.seconds, self._frame, self._sites, self._where = nodes, seconds, frame, sites, _UNSET

    @property
    def where(self):
        """file:line of the call in the user's code (None when only torch and shims are on the stack)."""
        if self._where is _UNSET:
            self._where = self._sites.where(self._frame)
        return self._where


class Call:
    """One intercepted call (Session.intercept): valid during the call only (it holds the caller's frame)."""

    __slots__ = ("original", "args", "kwargs", "frame", "result", "seconds", "state")
    WAITING, RAISED, DONE = 0, 1, 2

    def __init__(self, original, args, kwargs, frame):
        self.original, self.args, self.kwargs, self.frame = original, list(args), kwargs, frame
        self.result, self.seconds, self.state = None, None, Call.WAITING

    def proceed(self):
        """Run the original with the (possibly replaced) arguments; its time in `seconds`."""
        start = perf_counter()
        try:
            self.result = self.original(*self.args, **self.kwargs)
        except BaseException:
            self.state = Call.RAISED
            raise
        self.seconds = perf_counter() - start
        self.state = Call.DONE
        return self.result


class _Depth(threading.local):
    depth = 0
    start = 0.0
    outer = None  # weak reference to the outermost module being called (only without always_call)


class Session:
    """The detectors of one process: their events, wrappers and findings. `start()` installs, `revert()` undoes."""

    def __init__(self, engine, detector_classes):
        import torch
        self.torch = torch
        self.engine = engine
        self.strict = bool(engine.config and engine.config.strict)
        self.record = engine.receipt.record(RECORD, summary=SUMMARY, docs=DOCS)
        self.api = TorchAPI(torch)
        self.sites = CallSites(torch, engine)
        self.graphs = GraphTracker()
        self.detectors = [cls(self) for cls in detector_classes]
        self.active = False
        self.settling = False  # graphs handed over now are final for their step (step end, final flush)
        self.steps = 0  # optimizer steps seen (any optimizer): the "step" a forward or a host read belongs to
        self.accelerator = None  # device type of the first module trained on an accelerator
        self._owner = {}  # kind -> its detector
        self._module_calls, self._forwards, self._steps = [], [], []  # (detector, fn) per event
        self._module_outputs, self._grad_calls = [], []
        self._handles, self._wrapped, self._undo = [], [], []
        self._failed = set()  # names of the detectors (and core parts) switched off after an error
        self._tls = _Depth()
        self._compiling = self.api.is_compiling
        self._grad_enabled = torch.is_grad_enabled
        self._graph_task = self.api.graph_task_id or (lambda: -1)
        self._reset_on_reentry = "always_call" not in self.api.forward_hook_options
        self._findings = {}  # (kind, where) -> Finding, in the order first seen
        self._dirty = set()  # keys of findings with something new to write
        self._next_publish = 0.0  # perf_counter() time after which the hooks may write into the receipt again
        self._step_last, self._step_count, self._step_intervals = {}, {}, {}
        self._device_checked = set()
        self._storages = {}  # module id -> storage pointers of its parameters and buffers
        self.observation = Observation(torch)  # what was observed, findings or not (the report's summary, the timeline)

    # ------------------------------------------------------------------ what detectors call

    def on_module_call(self, detector, fn):
        """fn(module) after every module forward, at any depth, grad on or off (keep it cheap: every call)."""
        self._module_calls.append((detector, fn))

    def on_module_output(self, detector, fn):
        """fn(module, args, output) after every module forward, like on_module_call (positional inputs only)."""
        self._module_outputs.append((detector, fn))

    def on_autograd_grad(self, detector, fn):
        """fn(args, kwargs, frame) before each torch.autograd.grad call (one wrapper, shared by the detectors); it
        returns None or done(result), called after the call (result None when it raised)."""
        if not self._grad_calls:
            self.wrap(self.torch.autograd, "grad", self._autograd_grad_wrapper)
        self._grad_calls.append((detector, fn))

    def on_forward(self, detector, fn):
        """fn(call: ForwardCall) after each outermost forward with grad on that built an autograd graph."""
        self._forwards.append((detector, fn))

    def on_step(self, detector, fn):
        """fn(optimizer) after each optimizer step, once the step clock has counted it."""
        self._steps.append((detector, fn))

    def wrap(self, owner, attribute, make):
        """Replace owner.attribute by make(current), a plain function; revert() puts the original back. Returns it."""
        owned = attribute in owner.__dict__
        original = owner.__dict__[attribute] if owned else getattr(owner, attribute)
        current = getattr(owner, attribute)
        wrapper = make(current)  # a plain function, never a wrapt proxy: torch.compile traces Tensor/Module methods
        wrapper.__wrapped__ = current
        wrapper.__shims_original__ = current
        for field in ("__name__", "__qualname__", "__doc__"):
            try:
                setattr(wrapper, field, getattr(current, field))
            except (AttributeError, TypeError):
                pass
        setattr(owner, attribute, wrapper)
        self._wrapped.append((owner, attribute, original, wrapper, owned))
        return current

    def intercept(self, detector, owner, attribute, on_call, when=None):
        """Replace owner.attribute (a method or function) so that each call made while `detector.on`, `when(*args,
        **kwargs)` (a cheap first test, optional) and not while dynamo traces, runs `on_call(call)` instead, which
        returns what the caller gets: `call.proceed()` runs the original (once; `call.seconds` its time),
        `call.args` (a list: a detector may replace an argument), `call.kwargs`, `call.frame` (the caller's).
        Written once here: a detector that raises is switched off and named in the receipt, and the call still
        returns what the original returns; an exception of the original itself reaches the caller unchanged."""
        session = self

        def make(original):
            def intercepted(*args, **kwargs):
                if not detector.on or (when is not None and not when(*args, **kwargs)) or session._compiling():
                    return original(*args, **kwargs)
                call = Call(original, args, kwargs, sys._getframe(1))
                try:
                    return on_call(call)
                except BaseException as exc:
                    if call.state == Call.RAISED:
                        raise  # the original's own exception
                    session.fail(detector, exc)
                    return call.result if call.state == Call.DONE else original(*args, **kwargs)
            return intercepted
        return self.wrap(owner, attribute, make)

    def add_undo(self, fn):
        """fn() at revert (a handle to remove, a table entry to delete), in reverse order of registration."""
        self._undo.append(fn)

    def track_graph(self, detector, nodes, item, callback):
        """callback(item, reached) once autograd frees the graph of `nodes` (graphs.py); alive at the end of the run:
        take them with take_alive_graphs(detector)."""
        self.graphs.track(detector, nodes, item, callback)

    def take_alive_graphs(self, detector):
        return self.graphs.take_alive(detector)

    def saved_bytes(self, module, roots):
        """Activations an autograd graph saves for backward, `module`'s own parameters and buffers excluded."""
        own = self._storages.get(id(module))
        if own is None:
            own = self._storages[id(module)] = storages_of(module)
        return saved_activation_bytes(roots, own)

    def finding(self, kind, where):
        """The Finding of (kind, where), created on first use, marked to be written."""
        key = (kind, where)
        found = self._findings.get(key)
        if found is None:
            found = self._findings[key] = Finding(kind, where)
        self._dirty.add(key)
        return found

    def peek(self, kind, where):
        """The Finding of (kind, where) if there is one (nothing marked)."""
        return self._findings.get((kind, where))

    def where(self, frame):
        """file:line of the first user frame at or above `frame` (sites.py)."""
        return self.sites.where(frame)

    def compiling(self):
        """Whether dynamo is tracing right now (a hook or wrapper then stays out of the way)."""
        return self._compiling()

    def step_seconds(self):
        """Median interval between two steps of the most-stepped optimizer (None before two steps)."""
        if not self._step_count:
            return None
        busiest = max(self._step_count, key=self._step_count.get)
        return report.median(self._step_intervals.get(busiest, ()))

    def share(self, seconds):
        """', N% of the X ms median optimizer step' for a cost in seconds ('' before two steps)."""
        step = self.step_seconds()
        if not step or seconds is None:
            return ""
        return f", {100 * seconds / step:.0f}% of the {report.ms(step)} median optimizer step"

    def patch_at(self, where):
        """The patch whose own check already reported this very line (its fix is the one to name), or None."""
        return self.sites.patch_at(where, RECORD)

    def fail(self, detector, exc):
        """A detector raised: switch it off, say so in the receipt, keep the user's run going (strict: raise)."""
        name = detector if isinstance(detector, str) else detector.name
        if not isinstance(detector, str):
            detector.on = False
        if name not in self._failed:
            self._failed.add(name)
            self.record.note(f"detector {name} failed and was switched off: {type(exc).__name__}: {exc}")
            self.record.target(f"{TARGET}.{name}", "error", f"{type(exc).__name__}: {exc}")
        if self.strict:
            raise exc

    # ------------------------------------------------------------------ install / revert

    def start(self):
        self.active = True
        try:
            self._start()
        except BaseException:
            self.revert()
            raise

    def _start(self):
        watching = []
        self.wrap(self.torch.autograd, "backward", self._backward_wrapper)  # backward passes (summary, timeline)
        self.wrap(self.torch, "save", self._save_wrapper)  # checkpoints (what fell inside a --profile window)
        pre_hooks = getattr(self.api.optimizer_hooks, "register_optimizer_step_pre_hook", None)
        if pre_hooks is not None:
            self._handles.append(pre_hooks(self._before_step))
        for detector in self.detectors:
            reason = detector.missing(self.api)
            if reason:
                detector.on = False
                self.record.target(f"{TARGET}.{detector.name}", "skipped",
                                   f"refused ({', '.join(detector.kinds)}): {reason}")
                continue
            for kind in detector.kinds:
                self._owner[kind] = detector
            detector.install()
            if detector.observes:  # empty: nothing observed (the profiler when off)
                watching.append(detector.observes)
        if self.api.step_hooks is not None:
            self._handles.append(self.api.step_hooks(self._after_step))
            watching.insert(min(1, len(watching)), "optimizer steps")
            from shims.detect import steps_after_compile  # torch 2.0-2.2: compile unhooks optimizer steps
            steps_after_compile.install(self)
        self._install_forward_hooks()  # always: the forwards and evaluations observed are in every report
        import atexit
        atexit.register(self._at_exit)
        self.record.target(TARGET, "applied", "observing " + ", ".join(watching))

    def _install_forward_hooks(self):
        api = self.api
        self._handles.append(api.module_hooks.register_module_forward_pre_hook(self._before_forward))
        options = {name: True for name in api.forward_hook_options}
        handle = api.module_hooks.register_module_forward_hook(self._after_forward, **options)
        self._handles.append(handle)
        if api.kwargs_table is not None:
            table, hook_id = api.kwargs_table, handle.id
            # left behind, the entry keeps every module call on torch's slow path and torch.compile warning
            self.add_undo(lambda: table.pop(hook_id, None))
        for note in api.limits():
            self.record.note(note)
        if api.compiling_bound_late:
            from shims import hooks
            hooks.when_imported("torch._dynamo", self._bind_dynamo)
            self.add_undo(lambda: hooks.forget(self._bind_dynamo))
        import warnings
        # torch warns at each call of a torch.compile'd module while global module hooks exist: those are ours, and
        # the outermost-call rule already counts the compiled wrapper and its module as one forward
        warnings.filterwarnings("ignore", message=r"Using `torch\.compile\(module\)` when there are global hooks",
                                category=UserWarning)
        entry = warnings.filters[0]

        def remove_filter():
            if entry in warnings.filters:
                warnings.filters.remove(entry)
                getattr(warnings, "_filters_mutated", lambda: None)()
        self.add_undo(remove_filter)

    def _bind_dynamo(self, module):
        """torch 2.0-2.2: torch._dynamo was just imported (torch.compile): from now on ask it."""
        self._compiling = getattr(module, "is_compiling", None) or self._compiling

    def revert(self):
        """Write the findings, then remove every hook and put every wrapped attribute back (`is` the original)."""
        if not self.active:
            return
        try:
            self.flush(final=True)
        finally:
            self.active = False
            for detector in self.detectors:
                detector.on = False
            for handle in self._handles:
                handle.remove()
            self._handles = []
            for undo in reversed(self._undo):
                undo()
            self._undo = []
            for owner, attribute, original, wrapper, owned in reversed(self._wrapped):
                current = owner.__dict__.get(attribute)
                if current is not wrapper:
                    self.record.note(f"{getattr(owner, '__name__', owner)}.{attribute} was replaced after shims "
                                     "wrapped it; left as it is")
                    continue
                if owned:
                    setattr(owner, attribute, original)
                else:
                    delattr(owner, attribute)
            self._wrapped = []
            import atexit
            atexit.unregister(self._at_exit)
            self.record.target(TARGET, "reverted", "shims.disable() removed the detectors")

    def _at_exit(self):
        try:
            self.flush(final=True)
            from shims import config
            if not report.table_claimed() and not config.is_child():
                path = self.engine.report_path()  # written by the engine's own exit handler, which runs next
                report.print_findings(self.engine.receipt.as_dict(), report=os.path.abspath(path) if path else None,
                                      ignores=getattr(self.engine.config, "ignores", ()))
        except Exception as exc:  # noqa: BLE001 - never fail the user's exit
            sys.stderr.write(f"[shims] detect mode: could not write the findings: {type(exc).__name__}: {exc}\n")

    # ------------------------------------------------------------------ events

    def _dispatch(self, listeners, *args):
        for detector, fn in listeners:
            if detector.on:
                try:
                    fn(*args)
                except Exception as exc:  # noqa: BLE001
                    self.fail(detector, exc)

    def _before_forward(self, module, args):
        if self._compiling():
            return
        state = self._tls
        if state.depth == 0:
            state.start = perf_counter()
            if self._reset_on_reentry:
                state.outer = weakref.ref(module)
        elif self._reset_on_reentry and state.outer is not None and state.outer() is module:
            # no always_call hook in this torch: the earlier call of this module raised (a module never runs inside
            # itself), so no post-hook told us it ended
            state.depth = 0
            state.start = perf_counter()
        state.depth += 1

    def _after_forward(self, module, args, *kwargs_output):
        # (kwargs, output) with with_kwargs, else (output,); torch calls always_call hooks without kwargs when the
        # forward raised
        output = kwargs_output[-1]
        if self._compiling():
            return
        state = self._tls
        if state.depth > 0:
            state.depth -= 1
        if not self.active:
            return
        if not state.depth:
            frame = sys._getframe(1)
            self.observation.forward(module.training, state.start, perf_counter(),
                                     lambda: self.sites.where(frame))
            frame = None
        if self._module_calls:
            self._dispatch(self._module_calls, module)
        if self._module_outputs:
            self._dispatch(self._module_outputs, module, args, output)
        if state.depth or not self._forwards or not self._grad_enabled():
            return
        try:
            if self._graph_task() != -1:
                return  # re-run by autograd during a backward (activation checkpointing): not the user's forward
            nodes = tensors.grad_fns(self.torch.Tensor, output)
            if not nodes:
                return
            if module.training and id(module) not in self._device_checked:
                self._device_checked.add(id(module))
                param = next(module.parameters(), None)
                if param is not None and self.accelerator is None and tensors.on_accelerator(param):
                    self.accelerator = param.device.type
            call = ForwardCall(module, args, kwargs_output[0] if len(kwargs_output) == 2 else None, output, nodes,
                               perf_counter() - state.start, sys._getframe(1), self.sites)
        except Exception as exc:  # noqa: BLE001
            self._forwards = []
            self.fail("forward-events", exc)
            return
        self._dispatch(self._forwards, call)
        call._frame = None
        if self.graphs.pending():
            self._deliver_graphs()
        if self._dirty and perf_counter() >= self._next_publish:
            self._publish()

    def _after_step(self, optimizer, args, kwargs):
        if not self.active:
            return
        try:
            now = perf_counter()
            key = id(optimizer)
            last = self._step_last.get(key)
            if last is not None:
                intervals = self._step_intervals.get(key)
                if intervals is None:
                    intervals = self._step_intervals[key] = deque(maxlen=STEP_SAMPLES)
                intervals.append(now - last)
            self._step_last[key] = now
            self._step_count[key] = self._step_count.get(key, 0) + 1
            self.steps += 1
            self.observation.step(now)
            if self._reset_on_reentry:
                self._tls.depth = 0  # no forward spans an optimizer step; one that raised is over
        except Exception as exc:  # noqa: BLE001
            self.fail("optimizer-steps", exc)
            return
        self.settling = True
        try:
            self._deliver_graphs()
            self._dispatch(self._steps, optimizer)
        finally:
            self.settling = False
        if self._dirty and now >= self._next_publish:
            self._publish()

    def _before_step(self, optimizer, args, kwargs):
        if self.active:
            self.observation.step_started = perf_counter()

    def _backward_wrapper(self, original):
        session = self

        def backward(*args, **kwargs):
            start = perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if session.active and not session._compiling():
                    try:
                        frame = sys._getframe(1)
                        session.observation.backward(start, perf_counter(), lambda: session.sites.where(frame))
                        frame = None
                    except Exception as exc:  # noqa: BLE001
                        session.fail("backward-events", exc)
        return backward

    def _save_wrapper(self, original):
        observation = self.observation

        def save(*args, **kwargs):
            observation.saves += 1
            return original(*args, **kwargs)
        return save

    def _autograd_grad_wrapper(self, original):
        session, listeners = self, self._grad_calls

        def grad(*args, **kwargs):
            done, result = [], None
            for detector, fn in listeners:
                if detector.on:
                    try:
                        after = fn(args, kwargs, sys._getframe(1))
                        if after is not None:
                            done.append((detector, after))
                    except Exception as exc:  # noqa: BLE001
                        session.fail(detector, exc)
            try:
                result = original(*args, **kwargs)
                return result
            finally:
                for detector, after in done:
                    try:
                        after(result)
                    except Exception as exc:  # noqa: BLE001
                        session.fail(detector, exc)
        return grad

    def _deliver_graphs(self):
        for detector, callback, item, reached in self.graphs.freed():
            if detector.on:
                try:
                    callback(item, reached)
                except Exception as exc:  # noqa: BLE001
                    self.fail(detector, exc)

    # ------------------------------------------------------------------ findings

    def flush(self, final=False):
        """Write what the detectors know into the receipt now. `final`: the run is over (graphs still alive are
        judged, detectors' finish() adds the whole-run findings). Safe to call twice."""
        if not self.active:
            return
        self.settling = final
        try:
            self._deliver_graphs()
            if final:
                for detector in self.detectors:
                    if detector.on:
                        try:
                            detector.finish()
                        except Exception as exc:  # noqa: BLE001
                            self.fail(detector, exc)
                self.graphs.clear()
            self._publish()
        except Exception as exc:  # noqa: BLE001
            self.fail("flush", exc)
        finally:
            self.settling = False

    def _publish(self):
        """Write new and changed findings into the receipt (the record merges by kind and place). From the hooks,
        at most once per PUBLISH_EVERY seconds (shims.status() during a run is that fresh); at flush, always."""
        self._next_publish = perf_counter() + PUBLISH_EVERY
        dirty = set(self._dirty)
        self._dirty.clear()
        for key, found in list(self._findings.items()):  # in the order first seen
            if not found.count or (key not in dirty and found.count == found.published):
                continue
            detector = self._owner[found.kind]
            try:
                described = detector.describe(found)
                message, cost, fix = described[:3]
                fields = self.cost_fields(found)
                fields.update(described[3] if len(described) > 3 else {})
                fields.update(self.sites.reached_from(found.where))
            except Exception as exc:  # noqa: BLE001
                self.fail(detector, exc)
                continue
            entry = self.record.finding(found.kind, message, where=found.where, cost=cost, fix=fix,
                                        count=found.count - found.published)
            entry.update(fields)
            found.published = found.count
        try:
            self.record.observed = self.observation.as_dict(self.torch, self.step_seconds())
        except Exception as exc:  # noqa: BLE001
            self.fail("observed", exc)

    def cost_fields(self, found):
        """The numeric cost of a finding, for the JSON report and the ranking: `per` (step: a per-step cost,
        averaged over the optimizer steps observed; one-time: paid once, e.g. at a model's construction), `basis`
        (measured in this run, or estimate), `seconds_each` (median measured time of one occurrence),
        `seconds_per_step` and `step_share` (share of the median optimizer step), `bytes` (memory held, when the
        detector measured it). A detector adds or overrides fields by returning a dict as describe()'s 4th item."""
        each = found.seconds()
        once = bool(found.info.get("one_time"))
        fields = {"per": "one-time" if once else "step", "basis": "measured" if each is not None else "estimate",
                  "seconds_each": each, "seconds_per_step": None, "step_share": None,
                  "bytes": found.info.get("bytes")}
        if each is not None and once:
            fields["seconds_once"] = each * found.count
        elif each is not None and self.steps:
            per_step = each * found.count / self.steps
            fields["seconds_per_step"] = per_step
            step = self.step_seconds()
            fields["step_share"] = per_step / step if step else None
        return fields
