"""Generic detectors of the observe-only mode: `SHIMS_MODE=detect` / `python -m shims doctor script.py ARGS`.

They watch any training or evaluation loop, with no framework name, and change nothing it computes: global module
forward hooks, one optimizer-step hook, and wrappers around a handful of methods (Module.half/.to, a few Tensor methods
that read a value on the host, Tensor.register_hook, torch.autograd.grad, DataLoader construction). Every
finding names the call site in the user's code (the first frame outside torch and shims), how often it happened, a
measured cost where one can be measured (else an estimate, said so), and what fixes it.

    unused-forward        a forward (module in train mode, grad on) whose autograd graph no backward ever reached,
                          while the same module ran another forward in that optimizer step (doctr #1861)
    eval-with-grad        a module in eval mode run with grad enabled, graph never used: an evaluation building graphs
    half-eval             .half() / .to(torch.float16) on a module with normalisation layers, then evaluated
    hook-in-autograd-grad a parameter's tensor hook fired by torch.autograd.grad (which never writes .grad)
    hook-fired-twice      hooks registered at one place on one parameter fired twice in a single backward
    host-sync             .item() / .cpu() / .tolist() / print / float() / bool() of an accelerator tensor, most steps
    dataloader-workers    a DataLoader with num_workers=0 feeding accelerator training while the loop waits for data
    dataloader-pin-memory a DataLoader without pin_memory feeding host batches to accelerator training

How "never reached by backward" is known, cheaply and soundly: after the outermost forward (grad on), one small
callable is registered as a pre-hook on the grad_fn of each output tensor; autograd calls it when a backward (or
autograd.grad) passes through. A weak reference to that callable dies when autograd frees those nodes, i.e. when the
outputs are dropped: if it never fired, the graph was never used. Outputs still alive at exit are judged at exit.
Forwards that autograd itself runs during a backward (activation checkpointing) are ignored.

Everything a hook learns goes into small aggregates; findings are written into the receipt (record "detect") only at
safe points (after a forward, after an optimizer step, at flush), never from a garbage-collector callback. A detector
that raises is switched off and noted in the receipt; it never stops the user's run (SHIMS_STRICT=1 raises instead).
`install(engine)` is called by the engine when torch is imported in detect mode; it returns the revert callable.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from collections import deque
from time import perf_counter

RECORD = "detect"
SUMMARY = "generic detectors of the observe-only mode (SHIMS_MODE=detect, python -m shims doctor)"
DOCS = "docs/detect.md"

# kind -> what it means (the doctor table, docs/detect.md and tests read this one table)
KINDS = {
    "unused-forward": "a forward whose autograd graph no backward used, beside another forward of the module in the "
                      "same optimizer step",
    "eval-with-grad": "a module in eval mode run with grad enabled; the graph it built was never used",
    "half-eval": ".half() / .to(float16) on a module with normalisation layers, then evaluated in float16",
    "hook-in-autograd-grad": "a parameter's tensor hook fired by torch.autograd.grad",
    "hook-fired-twice": "tensor hooks registered at one place on one parameter fired twice in one backward",
    "host-sync": "a host read of an accelerator tensor (.item(), .cpu(), printing...) in most training steps",
    "dataloader-workers": "num_workers=0 while accelerator training waits for data",
    "dataloader-pin-memory": "pin_memory=False while host batches feed accelerator training",
}

SAMPLES = 64  # timing samples kept per finding (medians)
PUBLISH_EVERY = 1.0  # seconds between two writes of the findings into the receipt during a run
STEP_SAMPLES = 256  # optimizer step intervals kept per optimizer
OUTPUT_LIMIT = 16  # grad_fn nodes watched per forward (a forward's outputs are rarely more)
GRAPH_WALK_LIMIT = 20000  # autograd nodes visited to measure the activations an eval graph saves
SYNC_MIN_STEPS = 3  # a host-sync site must appear in at least this many optimizer steps ...
SYNC_STEP_SHARE = 0.5  # ... and in at least this share of them ("per step", not an occasional log line)
LOADER_WAIT_SHARE = 0.05  # num_workers=0 is reported when waiting for data takes at least this share of a step
FP16_MAX, FP16_TINY = 65504.0, 2.0 ** -14  # largest float16, smallest normal float16

_CURRENT = None  # the active Observer (one per process)


def install(engine):
    """Install the detectors for `engine` (called once torch is imported, in detect mode). Returns the revert."""
    global _CURRENT
    if _CURRENT is not None and _CURRENT.active:
        _CURRENT.revert()
    observer = Observer(engine)
    observer.start()
    _CURRENT = observer
    return observer.revert


def flush(final=False):
    """Write what the detectors know into the receipt now. `final`: the run is over (also judge the autograd graphs
    still alive, and write the whole-run findings). Called at exit and by shims.disable(); safe to call twice."""
    observer = _CURRENT
    if observer is not None:
        observer.flush(final=final)


def _on_accelerator(tensor):
    """Whether a tensor lives on an accelerator (a host read of it waits for the device). Tests replace this."""
    return not tensor.is_cpu and tensor.device.type != "meta"


def _is_norm(module):
    """A normalisation layer: torch's (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm...) or a framework's own
    class named like one (FrozenBatchNorm2d, LayerNorm2d)."""
    return "norm" in type(module).__name__.lower()


def _median(values):
    ordered = sorted(values)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _size(nbytes):
    for unit, scale in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _ms(seconds):
    if seconds < 1e-4:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1000:.2f} ms" if seconds < 0.01 else f"{seconds * 1000:.1f} ms"


class _Aggregate:
    """What one finding (kind, where) has accumulated; `published` is the part of `count` already in the receipt."""

    __slots__ = ("kind", "where", "count", "published", "samples", "info")

    def __init__(self, kind, where):
        self.kind, self.where, self.count, self.published = kind, where, 0, 0
        self.samples = deque(maxlen=SAMPLES)
        self.info = {}

    def add(self, seconds=None):
        self.count += 1
        if seconds is not None:
            self.samples.append(seconds)


class _Forward:
    """One outermost forward with grad on, waiting to learn whether a backward reaches its outputs.
    `repeats`: forwards of the same module on the very same input tensor in the same optimizer step (1 = alone)."""

    __slots__ = ("module_id", "name", "training", "seconds", "where", "reached", "judged", "repeats")

    def __init__(self, module_id, name, training, seconds, where):
        self.module_id, self.name, self.training = module_id, name, training
        self.seconds, self.where, self.reached, self.judged, self.repeats = seconds, where, False, False, 1


class _Reached:
    """Registered as a pre-hook on the output nodes of a forward: autograd calls it when a backward gets there."""

    __slots__ = ("forward", "__weakref__")

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, grad_outputs):
        self.forward.reached = True


class _GraphWatch(weakref.ref):
    """Dies with the forward's output nodes; its callback only queues it (no locks, no receipt, inside GC)."""

    __slots__ = ("forward",)


class _Halved:
    __slots__ = ("module_ref", "where", "how", "evaluated")

    def __init__(self, module_ref, where, how):
        self.module_ref, self.where, self.how, self.evaluated = module_ref, where, how, False


class _ParamHook:
    """Wraps a hook the user registered on a parameter with Tensor.register_hook; returns exactly what it returns.
    `key`: the parameter, the place and the hook's code, so that the same hook registered twice shares one key."""

    __slots__ = ("fn", "where", "key", "observer", "__weakref__")

    def __init__(self, fn, where, param_id, observer):
        self.fn, self.where, self.observer = fn, where, observer
        self.key = (param_id, where, _hook_code(fn))

    def __call__(self, grad):
        observer = self.observer
        if observer.active and observer.param_hook_fired(self):
            start = perf_counter()
            result = self.fn(grad)
            observer.param_hook_timed(self, perf_counter() - start)
            return result
        return self.fn(grad)


class _LoaderInfo:
    __slots__ = ("where", "num_workers", "pin_memory", "batches", "wait", "host_batches")

    def __init__(self, where, num_workers, pin_memory):
        self.where, self.num_workers, self.pin_memory = where, num_workers, pin_memory
        self.batches, self.wait, self.host_batches = 0, 0.0, None


class _Depth(threading.local):
    depth = 0
    start = 0.0


class Observer:
    """The detectors of one process: their hooks, wrappers and aggregates. `start()` installs, `revert()` undoes."""

    def __init__(self, engine):
        import torch
        self.torch = torch
        self.engine = engine
        self.strict = bool(engine.config and engine.config.strict)
        self.record = engine.receipt.record(RECORD, summary=SUMMARY, docs=DOCS)
        self.active = False
        self.off = set()  # detectors switched off after an internal error
        self._handles = []
        self._warning_filter = None
        self._kwargs_entry = None
        self._wrapped = []  # (owner, attribute, original, wrapper, owned): owned = attribute was in owner.__dict__
        self._tls = _Depth()
        self._compiling = torch.compiler.is_compiling
        self._grad_enabled = torch.is_grad_enabled
        self._graph_task = torch._C._current_graph_task_id  # -1 outside a backward
        self._skip_prefixes = self._internal_prefixes()
        self._skip_code = {}  # code object -> True when the frame is torch's or shims' own
        self._aggregates = {}  # (kind, where) -> _Aggregate, in the order first seen
        self._dirty = set()  # keys of aggregates with something new to write
        self._next_publish = 0.0  # perf_counter() time after which the hooks may write into the receipt again
        # optimizer steps
        self._window = 0  # optimizer steps seen (any optimizer): the "step" a forward or a sync belongs to
        self._step_last, self._step_count, self._step_intervals = {}, {}, {}
        self._same_input = {}  # (module id) -> [(weakref to first input tensor, [_Forward...])] in this step
        # graphs
        self._watches = {}  # id(watch) -> _GraphWatch of forwards whose outputs are alive
        self._step_waiting = []  # unused training forwards, judged when their optimizer step ends
        self._gone = deque()  # _GraphWatch objects whose graph was freed (appended from GC callbacks)
        self._measured_saved = {}  # where -> bytes of activations an eval graph saves (first call measured)
        self._param_storages = {}  # module id -> set of parameter/buffer storage pointers
        # half
        self._halved = {}  # id(module) -> _Halved
        self._half_stats = {}  # where -> text about the normalisation layers cast to float16
        # parameter hooks
        self._in_autograd_grad = 0
        self._hook_task = {}  # _ParamHook.key -> [graph task id, firings in it]
        # host syncs
        self._in_sync = False
        self._sync_sites = {}  # where -> [calls, windows hit, last window, seconds samples]
        # accelerator training and data
        self._accelerator = None  # device type of the first module trained on an accelerator
        self._device_checked = set()
        self._loaders = weakref.WeakKeyDictionary()  # DataLoader -> _LoaderInfo
        self._loader_infos = []  # every _LoaderInfo, judged at the end even when its DataLoader is gone
        self._iterators = weakref.WeakKeyDictionary()  # DataLoader iterator -> _LoaderInfo
        self._covered = self._modules_patches_observe()

    # ------------------------------------------------------------------ install / revert

    def _modules_patches_observe(self):
        """module name -> names of the enabled patches with an observe-only check that target a function there."""
        from shims.patch import MAIN
        config, modules = self.engine.config, {}
        for patch in self.engine.registry:
            if config is None or patch.detect is None or patch.name not in config.patches:
                continue
            try:
                targets = patch.resolve_targets(config.options[patch.name])
            except Exception:  # noqa: BLE001 - a patch's own problem, reported by the engine
                continue
            for target in targets:
                if target.module not in (MAIN, "torch") and not target.module.startswith("torch."):
                    modules.setdefault(target.module, set()).add(patch.name)
        return modules

    def _covered_frame(self, frame):
        """Whether this frame runs code of a module where a patch's own observe-only check is applied (ColossalAI's
        optimizer registering its reduction hooks, rfdetr's evaluate calling .half()): that patch reports the
        mistake in its terms, so the generic hook and float16 checks do not report it a second time."""
        name = frame.f_globals.get("__name__")
        patches = self._covered.get(name) if self._covered else None
        if not patches:
            return False
        records = self.engine.receipt.records
        for patch in patches:
            record = records.get(patch)
            if record is not None and any(key.startswith(f"{name}:") and target["status"] == "applied"
                                          for key, target in list(record.targets.items())):
                return True
        return False

    def _internal_prefixes(self):
        import shims
        folders = [os.path.dirname(self.torch.__file__), os.path.dirname(os.path.abspath(shims.__file__))]
        patches = sys.modules.get("shims.patches")
        if patches is not None and getattr(patches, "__file__", None):
            folders.append(os.path.dirname(os.path.abspath(patches.__file__)))
        return tuple(os.path.join(f, "") for f in folders)

    def start(self):
        self.active = True
        try:
            self._start()
        except BaseException:
            self.revert()
            raise

    def _start(self):
        torch = self.torch
        from torch.nn.modules import module as module_hooks
        from torch.optim import optimizer as optimizer_hooks
        self._handles.append(module_hooks.register_module_forward_pre_hook(self._before_forward))
        forward_hook = module_hooks.register_module_forward_hook(self._after_forward, with_kwargs=True,
                                                                 always_call=True)
        self._handles.append(forward_hook)
        # torch 2.x: the handle forgets its with_kwargs entry on remove(); left behind, it keeps every module call on
        # the slow path and torch.compile warning about global hooks: revert() deletes it
        self._kwargs_entry = (module_hooks._global_forward_hooks_with_kwargs, forward_hook.id)
        self._handles.append(optimizer_hooks.register_optimizer_step_post_hook(self._after_step))
        import warnings
        # torch warns at each call of a torch.compile'd module while global module hooks exist: those are ours, and
        # the outermost-call rule already counts the compiled wrapper and its module as one forward
        warnings.filterwarnings("ignore", message=r"Using `torch\.compile\(module\)` when there are global hooks",
                                category=UserWarning)
        self._warning_filter = warnings.filters[0]

        nn_module = torch.nn.Module
        self._wrap(nn_module, "half", self._make_half_wrapper(nn_module.half))
        self._wrap(nn_module, "to", self._make_to_wrapper(nn_module.to))
        for name in ("item", "tolist", "cpu", "__float__", "__int__", "__bool__", "__repr__", "__format__"):
            self._wrap(torch.Tensor, name, self._make_sync_wrapper(getattr(torch.Tensor, name)))
        self._wrap(torch.Tensor, "register_hook", self._make_register_hook_wrapper(torch.Tensor.register_hook))
        self._wrap(torch.autograd, "grad", self._make_autograd_grad_wrapper(torch.autograd.grad))
        from torch.utils.data import dataloader
        self._wrap(dataloader.DataLoader, "__init__", self._make_loader_init_wrapper(dataloader.DataLoader.__init__))
        self._wrap(dataloader.DataLoader, "__iter__", self._make_loader_iter_wrapper(dataloader.DataLoader.__iter__))
        self._wrap(dataloader._BaseDataLoaderIter, "__next__",
                   self._make_loader_next_wrapper(dataloader._BaseDataLoaderIter.__next__))
        watching = ["forwards", "optimizer steps", ".half()/.to(float16)", "host reads of tensors",
                    "parameter tensor hooks", "DataLoaders"]
        import atexit
        atexit.register(self._at_exit)
        self.record.target("torch:detectors", "applied", "observing " + ", ".join(watching))

    def _wrap(self, owner, attribute, wrapper):
        owned = attribute in owner.__dict__
        original = owner.__dict__[attribute] if owned else getattr(owner, attribute)
        wrapper.__wrapped__ = original
        wrapper.__shims_original__ = original
        for field in ("__name__", "__qualname__", "__doc__"):
            try:
                setattr(wrapper, field, getattr(original, field))
            except (AttributeError, TypeError):
                pass
        setattr(owner, attribute, wrapper)
        self._wrapped.append((owner, attribute, original, wrapper, owned))

    def revert(self):
        """Write the findings, then remove every hook and put every wrapped attribute back (`is` the original)."""
        if not self.active:
            return
        try:
            self.flush(final=True)
        finally:
            self.active = False
            for handle in self._handles:
                handle.remove()
            self._handles = []
            if self._kwargs_entry is not None:
                entries, hook_id = self._kwargs_entry
                entries.pop(hook_id, None)
            import warnings
            if self._warning_filter in warnings.filters:
                warnings.filters.remove(self._warning_filter)
                getattr(warnings, "_filters_mutated", lambda: None)()
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
            self.record.target("torch:detectors", "reverted", "shims.disable() removed the detectors")

    def _at_exit(self):
        try:
            self.flush(final=True)
            from shims import config, doctor
            if not doctor.table_registered() and not config.is_child():
                report = self.engine.report_path()  # written by the engine's own exit handler, which runs next
                doctor.print_findings(self.engine.receipt.as_dict(), report=os.path.abspath(report) if report else None)
        except Exception as exc:  # noqa: BLE001 - never fail the user's exit
            sys.stderr.write(f"[shims] detect mode: could not write the findings: {type(exc).__name__}: {exc}\n")

    def _fail(self, detector, exc):
        """A detector raised: switch it off, say so in the receipt, keep the user's run going (strict: raise)."""
        if detector not in self.off:
            self.off.add(detector)
            self.record.note(f"detector {detector} failed and was switched off: {type(exc).__name__}: {exc}")
            self.record.target(f"torch:detectors.{detector}", "error", f"{type(exc).__name__}: {exc}")
        if self.strict:
            raise exc

    # ------------------------------------------------------------------ call sites

    def _user_frame(self, frame):
        """The first frame at or above `frame` that is neither torch's nor shims' own (None if there is none)."""
        skip = self._skip_code
        while frame is not None:
            code = frame.f_code
            internal = skip.get(code)
            if internal is None:
                internal = skip[code] = code.co_filename.startswith(self._skip_prefixes)
            if not internal:
                return frame
            frame = frame.f_back
        return None

    def _where(self, frame):
        """file:line of the first frame at or above `frame` that is neither torch's nor shims' own."""
        frame = self._user_frame(frame)
        return None if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"

    def _direct_caller(self, frame):
        """file:line of `frame` when it is user (or framework) code; None when torch or shims itself is calling."""
        code = frame.f_code
        internal = self._skip_code.get(code)
        if internal is None:
            internal = self._skip_code[code] = code.co_filename.startswith(self._skip_prefixes)
        return None if internal else f"{code.co_filename}:{frame.f_lineno}"

    # ------------------------------------------------------------------ forwards (unused-forward, eval-with-grad)

    def _before_forward(self, module, args):
        if self._compiling():
            return
        state = self._tls
        if state.depth == 0:
            state.start = perf_counter()
        state.depth += 1

    def _after_forward(self, module, args, *kwargs_output):
        # (kwargs, output); torch calls always_call hooks without kwargs when the forward raised
        output = kwargs_output[-1]
        if self._compiling():
            return
        state = self._tls
        if state.depth > 0:
            state.depth -= 1
        if not self.active:
            return
        if self._halved and id(module) in self._halved:
            self._halved_forward(module)
        if state.depth or "forwards" in self.off or not self._grad_enabled():
            return
        try:
            if self._graph_task() != -1:
                return  # re-run by autograd during a backward (activation checkpointing): not the user's forward
            self._outer_forward(module, args, kwargs_output[0] if len(kwargs_output) == 2 else None, output,
                                perf_counter() - state.start)
        except Exception as exc:  # noqa: BLE001
            self._fail("forwards", exc)

    def _outer_forward(self, module, args, kwargs, output, seconds):
        nodes = _grad_fns(self.torch.Tensor, output)
        if not nodes:
            return
        module_id, training = id(module), module.training
        if training and module_id not in self._device_checked:
            self._device_checked.add(module_id)
            param = next(module.parameters(), None)
            if param is not None and self._accelerator is None and _on_accelerator(param):
                self._accelerator = param.device.type
        where = self._where(sys._getframe(1))
        name = type(getattr(module, "_orig_mod", module)).__name__  # a torch.compile'd module: the model's name
        forward = _Forward(module_id, name, training, seconds, where)
        if training:
            self._group_by_input(module_id, _first_tensor(self.torch.Tensor, args, kwargs), forward)
        if not training and where not in self._measured_saved:
            self._measured_saved[where] = self._saved_activation_bytes(module, nodes)
        reached = _Reached(forward)
        for node in nodes:
            node.register_prehook(reached)
        watch = _GraphWatch(reached, self._gone.append)
        watch.forward = forward
        self._watches[id(watch)] = watch
        if self._gone:
            self._judge_gone()
        if self._dirty and perf_counter() >= self._next_publish:
            self._publish()

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

    def _judge_gone(self, step_over=False):
        """Judge the forwards whose graphs were freed. A training forward waits for the end of its optimizer step:
        a later forward on the same input in that step (which makes it a duplicate) may still come."""
        gone, waiting = self._gone, self._step_waiting
        while gone:
            watch = gone.popleft()
            self._watches.pop(id(watch), None)
            forward = watch.forward
            if forward.training and not step_over and not forward.reached:
                waiting.append(forward)
            else:
                self._judge(forward)
        if step_over:
            while waiting:
                self._judge(waiting.pop())

    def _judge(self, forward):
        if forward.reached or forward.judged:
            return
        forward.judged = True
        if not forward.training:
            agg = self._aggregate("eval-with-grad", forward.where)
            agg.add(forward.seconds)
            agg.info["name"] = forward.name
            return
        if forward.repeats < 2:
            return  # no other forward on this input in its step (a skipped batch, a metric pass): not a duplicate
        agg = self._aggregate("unused-forward", forward.where)
        agg.add(forward.seconds)
        agg.info["name"] = forward.name
        agg.info["forwards"] = max(forward.repeats, agg.info.get("forwards", 0))

    def _saved_activation_bytes(self, module, roots):
        """Bytes of the tensors an autograd graph saves for backward, parameters and buffers excluded. Saved tensors
        with unpack hooks (checkpointing, offloading) are not opened: opening them could run user code."""
        own = self._param_storages.get(id(module))
        if own is None:
            own = set()
            for tensor in list(module.parameters()) + list(module.buffers()):
                try:
                    own.add(tensor.untyped_storage().data_ptr())
                except Exception:  # noqa: BLE001 - a tensor without storage (meta, sparse)
                    pass
            self._param_storages[id(module)] = own
        seen_nodes, seen_storages, total = {}, set(), 0
        stack = list(roots)
        attributes = {}
        while stack and len(seen_nodes) < GRAPH_WALK_LIMIT:
            node = stack.pop()
            if node is None or id(node) in seen_nodes:
                continue
            seen_nodes[id(node)] = node
            names = attributes.get(type(node))
            if names is None:
                names = attributes[type(node)] = [a for a in dir(node) if a.startswith("_raw_saved_")]
            for name in names:
                try:
                    raw = getattr(node, name)
                except Exception:  # noqa: BLE001 - freed or not a tensor
                    continue
                for saved in raw if isinstance(raw, (list, tuple)) else (raw,):
                    if getattr(saved, "unpack_hook", None) is not None:
                        continue
                    try:
                        tensor = saved.data
                        storage = tensor.untyped_storage()
                        key = storage.data_ptr()
                    except Exception:  # noqa: BLE001
                        continue
                    if key in own or key in seen_storages:
                        continue
                    seen_storages.add(key)
                    total += storage.nbytes()
            stack.extend(next_node for next_node, _ in node.next_functions)
        return total

    # ------------------------------------------------------------------ optimizer steps

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
            self._window += 1
            self._judge_gone(step_over=True)
            self._same_input.clear()  # a new optimizer step: forwards from now on are compared among themselves
            if self._dirty and now >= self._next_publish:
                self._publish()
        except Exception as exc:  # noqa: BLE001
            self._fail("optimizer-steps", exc)

    def step_seconds(self):
        """Median interval between two steps of the most-stepped optimizer (None before two steps)."""
        if not self._step_count:
            return None
        busiest = max(self._step_count, key=self._step_count.get)
        return _median(self._step_intervals.get(busiest, ()))

    # ------------------------------------------------------------------ half (half-eval)

    def _make_half_wrapper(self, original):
        observer = self

        def half(self, *args, **kwargs):
            if observer.active:
                observer.cast_to_float16(self, ".half()", sys._getframe(1))
            return original(self, *args, **kwargs)
        return half

    def _make_to_wrapper(self, original):
        observer = self

        def to(self, *args, **kwargs):
            if observer.active:
                try:
                    dtype = observer.torch._C._nn._parse_to(*args, **kwargs)[1]
                except Exception:  # noqa: BLE001 - bad arguments: the original raises its own error below
                    dtype = None
                if dtype is observer.torch.float16:
                    observer.cast_to_float16(self, ".to(torch.float16)", sys._getframe(1))
            return original(self, *args, **kwargs)
        return to

    def cast_to_float16(self, module, how, frame):
        if "half" in self.off:
            return
        try:
            frame = self._user_frame(frame)
            if frame is None or self._covered_frame(frame):
                return
            norms = [m for m in module.modules() if _is_norm(m)]
            if not norms:
                return
            where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
            if where not in self._half_stats:
                self._half_stats[where] = self._fp16_damage(norms)
            self._halved[id(module)] = _Halved(weakref.ref(module), where, f"{type(module).__name__}{how}")
        except Exception as exc:  # noqa: BLE001
            self._fail("half", exc)

    def _fp16_damage(self, norms):
        """What float16 does to these normalisation layers' weights and statistics (measured before the cast)."""
        torch = self.torch
        values = overflow = flushed = subnormal = 0
        worst = 0.0
        small_eps = set()
        with torch.no_grad():
            for norm in norms:
                eps = getattr(norm, "eps", None)
                if isinstance(eps, float) and 0 < eps < FP16_TINY:
                    small_eps.add(eps)
                for tensor in list(norm.parameters(recurse=False)) + list(norm.buffers(recurse=False)):
                    if not tensor.is_floating_point() or tensor.dtype == torch.float16 or tensor.numel() == 0:
                        continue
                    exact = tensor.detach().double()
                    rounded = tensor.detach().half().double()
                    magnitude = exact.abs()
                    values += exact.numel()
                    overflow += int((magnitude > FP16_MAX).sum())
                    flushed += int(((rounded == 0) & (exact != 0)).sum())
                    subnormal += int(((magnitude < FP16_TINY) & (rounded != 0)).sum())
                    finite = (magnitude > 0) & torch.isfinite(rounded)
                    if bool(finite.any()):
                        worst = max(worst, float(((rounded - exact).abs()[finite] / magnitude[finite]).max()))
        text = (f"{len(norms)} normalisation layer(s) ({values} weights/statistics) cast to float16: {overflow} "
                f"overflow to inf, {flushed} flush to zero, {subnormal} become subnormal, max relative rounding "
                f"error {worst:.1e}")
        if small_eps:
            text += f"; eps {', '.join(f'{e:g}' for e in sorted(small_eps))} is below float16's normal range"
        return text

    def _halved_forward(self, module):
        try:
            halved = self._halved.get(id(module))
            if halved is None or halved.module_ref() is not module:
                self._halved.pop(id(module), None)
                return
            if module.training != halved.evaluated:
                return  # evaluated again, or trained before any evaluation (deliberate float16 training)
            param = next(module.parameters(), None)
            still_half = param is not None and param.dtype == self.torch.float16
            if not module.training:
                if not still_half:
                    del self._halved[id(module)]  # cast back before evaluating: nothing to report
                    return
                halved.evaluated = True
                agg = self._aggregate("half-eval", halved.where)
                agg.add()
                agg.info["how"] = halved.how
            else:
                if still_half:
                    agg = self._aggregate("half-eval", halved.where)
                    agg.info["trained_after"] = self._where(sys._getframe(1))
                del self._halved[id(module)]
        except Exception as exc:  # noqa: BLE001
            self._fail("half", exc)

    # ------------------------------------------------------------------ host reads (host-sync)

    def _make_sync_wrapper(self, original):
        observer = self

        def host_read(self, *args, **kwargs):
            if observer.active and not observer._in_sync and _on_accelerator(self):
                return observer.timed_host_read(original, self, args, kwargs, sys._getframe(1))
            return original(self, *args, **kwargs)
        return host_read

    def timed_host_read(self, original, tensor, args, kwargs, frame):
        where = None
        if "host-sync" not in self.off and not self._compiling():
            where = self._direct_caller(frame)
        if where is None:
            return original(tensor, *args, **kwargs)
        self._in_sync = True
        try:
            start = perf_counter()
            result = original(tensor, *args, **kwargs)
            seconds = perf_counter() - start
        finally:
            self._in_sync = False
        site = self._sync_sites.get(where)
        if site is None:
            site = self._sync_sites[where] = [0, 0, -1, deque(maxlen=SAMPLES)]
        site[0] += 1
        if site[2] != self._window:
            site[1] += 1
            site[2] = self._window
        site[3].append(seconds)
        return result

    # ------------------------------------------------------------------ parameter hooks

    def _make_register_hook_wrapper(self, original):
        observer = self

        def register_hook(self, hook):
            if observer.active and "hooks" not in observer.off and isinstance(self, observer.torch.nn.Parameter):
                frame = sys._getframe(1)
                where = observer._direct_caller(frame)
                if where is not None and not observer._covered_frame(frame):
                    hook = _ParamHook(hook, where, id(self), observer)
            return original(self, hook)
        return register_hook

    def _make_autograd_grad_wrapper(self, original):
        observer = self

        def grad(*args, **kwargs):
            observer._in_autograd_grad += 1
            try:
                return original(*args, **kwargs)
            finally:
                observer._in_autograd_grad -= 1
        return grad

    def param_hook_fired(self, probe):
        """Count one firing; True when it is a mistaken one (then the caller times the hook's own work)."""
        try:
            key = probe.key
            task = self._graph_task()
            seen = self._hook_task.get(key)
            if seen is not None and seen[0] == task:
                seen[1] += 1
                if seen[1] == 2:
                    self._aggregate("hook-fired-twice", probe.where).add()
            else:
                self._hook_task[key] = [task, 1]
            if self._in_autograd_grad:
                agg = self._aggregate("hook-in-autograd-grad", probe.where)
                agg.count += 1
                return True
        except Exception as exc:  # noqa: BLE001
            self._fail("hooks", exc)
        return False

    def param_hook_timed(self, probe, seconds):
        agg = self._aggregates.get(("hook-in-autograd-grad", probe.where))
        if agg is not None:
            agg.samples.append(seconds)

    # ------------------------------------------------------------------ DataLoader

    def _make_loader_init_wrapper(self, original):
        observer = self

        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            if observer.active and "dataloaders" not in observer.off:
                try:
                    info = _LoaderInfo(observer._where(sys._getframe(1)), getattr(self, "num_workers", None),
                                       bool(getattr(self, "pin_memory", False)))
                    observer._loaders[self] = info
                    observer._loader_infos.append(info)
                except Exception as exc:  # noqa: BLE001
                    observer._fail("dataloaders", exc)
        return __init__

    def _make_loader_iter_wrapper(self, original):
        observer = self

        def __iter__(self):
            iterator = original(self)
            if observer.active:
                info = observer._loaders.get(self)
                if info is not None:
                    try:
                        observer._iterators[iterator] = info
                    except TypeError:  # an iterator that cannot be weakly referenced: not timed
                        pass
            return iterator
        return __iter__

    def _make_loader_next_wrapper(self, original):
        observer = self

        def __next__(self):
            info = observer._iterators.get(self) if observer.active else None
            if info is None:
                return original(self)
            start = perf_counter()
            batch = original(self)
            info.wait += perf_counter() - start
            info.batches += 1
            if info.host_batches is None:
                info.host_batches = _has_host_tensor(observer.torch.Tensor, batch)
            return batch
        return __next__

    # ------------------------------------------------------------------ findings

    def _aggregate(self, kind, where):
        key = (kind, where)
        agg = self._aggregates.get(key)
        if agg is None:
            agg = self._aggregates[key] = _Aggregate(kind, where)
        self._dirty.add(key)
        return agg

    def flush(self, final=False):
        if not self.active:
            return
        try:
            self._judge_gone(step_over=final)
            if final:
                for watch in list(self._watches.values()):
                    if watch() is not None:
                        self._judge(watch.forward)
                self._watches.clear()
                self._run_finals()
            self._publish()
        except Exception as exc:  # noqa: BLE001
            self._fail("flush", exc)

    def _run_finals(self):
        """Findings that need the whole run: host reads per step, DataLoader settings."""
        windows = self._window
        for where, (calls, hit, _, samples) in self._sync_sites.items():
            if windows and hit >= SYNC_MIN_STEPS and hit >= SYNC_STEP_SHARE * windows:
                agg = self._aggregate("host-sync", where)
                agg.count = calls
                agg.samples = deque(samples, maxlen=SAMPLES)
                agg.info["steps_hit"], agg.info["steps"] = hit, windows
        if self._accelerator is not None:
            step = self.step_seconds()
            for info in self._loader_infos:
                if not info.batches:
                    continue
                wait = info.wait / info.batches
                if info.num_workers == 0 and step and wait >= LOADER_WAIT_SHARE * step:
                    agg = self._aggregate("dataloader-workers", info.where)
                    agg.count = info.batches
                    agg.info.update(wait=wait, step=step)
                if not info.pin_memory and info.host_batches:
                    agg = self._aggregate("dataloader-pin-memory", info.where)
                    agg.count = info.batches

    def _publish(self):
        """Write new and changed aggregates into the receipt (the record merges by kind and place). From the hooks,
        at most once per PUBLISH_EVERY seconds (shims.status() during a run is that fresh); at flush, always."""
        self._next_publish = perf_counter() + PUBLISH_EVERY
        dirty = set(self._dirty)
        self._dirty.clear()
        for key, agg in list(self._aggregates.items()):  # in the order first seen
            if not agg.count or (key not in dirty and agg.count == agg.published):
                continue
            message, cost, fix = self._describe(agg)
            self.record.finding(agg.kind, message, where=agg.where, cost=cost, fix=fix,
                                count=agg.count - agg.published)
            agg.published = agg.count

    def _patch_at(self, where):
        """The patch whose own check already reported this very line (its fix is the one to use), or None."""
        for name, rec in list(self.engine.receipt.records.items()):
            if name != RECORD and any(f["where"] == where for f in rec.findings):
                return name
        return None

    def _share(self, seconds):
        step = self.step_seconds()
        if not step or seconds is None:
            return ""
        return f", {100 * seconds / step:.0f}% of the {_ms(step)} median optimizer step"

    def _describe(self, agg):
        """(message, cost, fix) of a finding, from what its aggregate holds now."""
        kind, info = agg.kind, agg.info
        seconds = _median(agg.samples)
        if kind == "unused-forward":
            forwards = info.get("forwards")
            message = (f"{info['name']} forward here built an autograd graph that no backward used, while the "
                       f"module ran {forwards} forwards with grad on this same input in that optimizer step")
            cost = (f"{_ms(seconds)} per occurrence (measured forward time){self._share(seconds)}; plus its dropout "
                    "draws and BatchNorm statistics updates, which change training")
            patch = self._patch_at(agg.where)
            fix = (f"the {patch} patch removes this forward: run with SHIMS_MODE=fix (the default)" if patch else
                   "delete this forward if its result is not needed; if only its value is needed, reuse the output "
                   "of the forward that is backpropagated, or run it under torch.no_grad()")
            return message, cost, fix
        if kind == "eval-with-grad":
            saved = self._measured_saved.get(agg.where)
            message = (f"{info['name']} in eval mode ran forward with grad enabled; the autograd graph it built was "
                       "never used by a backward")
            cost = (f"{_size(saved)} of activations saved for backward per call (measured on the first call), "
                    f"held until the outputs are dropped; forward {_ms(seconds)} (median)") if saved is not None \
                else f"an autograd graph per call; forward {_ms(seconds)} (median)"
            fix = ("run the evaluation under `with torch.no_grad():` or torch.inference_mode(), or decorate the "
                   "evaluation function with @torch.no_grad() (as DETR-style evaluate functions do)")
            return message, cost, fix
        if kind == "half-eval":
            message = (f"{info.get('how', '.half()')} puts normalisation layers in float16, and the module was then "
                       "evaluated in float16")
            if info.get("trained_after"):
                message += f"; training resumed with it still float16 (forward at {info['trained_after']})"
            cost = self._half_stats.get(agg.where, "") + " (measured on the weights before the cast)"
            patch = self._patch_at(agg.where)
            fix = ("evaluate under torch.autocast(device_type, dtype=torch.float16) with float32 weights instead of "
                   "casting the model (autocast keeps normalisation in float32); "
                   + (f"the {patch} patch does this: SHIMS_MODE=fix" if patch else
                      "if a cast is needed, cast a copy and keep the normalisation layers in float32"))
            return message, cost, fix
        if kind == "host-sync":
            steps_hit, steps = info.get("steps_hit", 0), info.get("steps", 0)
            message = (f"a host read of an accelerator tensor here ({agg.count} calls, in {steps_hit} of {steps} "
                       "optimizer steps): each waits for the device to finish the queued work")
            per_step = seconds * agg.count / steps if seconds is not None and steps else None
            cost = (f"{_ms(seconds)} blocked per call (measured), about {_ms(per_step)} per step"
                    f"{self._share(per_step)}; the device also idles while the host catches up") \
                if per_step is not None else "one device synchronisation per call"
            fix = ("keep running values on the device (total += loss.detach()) and read them every N steps or at the "
                   "end of the epoch; log and print tensors less often")
            return message, cost, fix
        if kind == "dataloader-workers":
            message = ("DataLoader with num_workers=0: batches are loaded in the training process, between steps, "
                       f"while the {self._accelerator} waits")
            cost = (f"{_ms(info['wait'])} waiting for each batch (measured), "
                    f"{100 * info['wait'] / info['step']:.0f}% of the {_ms(info['step'])} median step")
            fix = "DataLoader(..., num_workers=N) with N >= 2 (and persistent_workers=True)"
            return message, cost, fix
        if kind == "dataloader-pin-memory":
            message = (f"DataLoader without pin_memory feeds host batches to training on the {self._accelerator}: "
                       "copies come from pageable memory")
            cost = ("estimated: host-to-device copies from pageable memory are staged and synchronous; "
                    ".to(device, non_blocking=True) cannot overlap them with compute")
            fix = "DataLoader(..., pin_memory=True), and .to(device, non_blocking=True) on the batches"
            return message, cost, fix
        if kind == "hook-in-autograd-grad":
            message = (f"a tensor hook registered here on a parameter fired {agg.count} time(s) inside "
                       "torch.autograd.grad, which never writes .grad: whatever it does (e.g. queue the gradient "
                       "for reduction) runs on a gradient that is not the parameter's")
            cost = (f"{_ms(seconds)} per spurious firing (measured hook time); for a gradient-reduction hook, a "
                    "phantom or duplicated reduction") if seconds is not None else "one spurious hook call per firing"
            fix = ("param.register_post_accumulate_grad_hook (torch >= 2.1): it fires once per backward, after .grad "
                   "is updated, and never for autograd.grad (ColossalAI #5601, fixed in PR #5596)")
            return message, cost, fix
        if kind == "hook-fired-twice":
            message = (f"tensor hooks registered here on the same parameter fired twice in one backward "
                       f"({agg.count} time(s)): the hook was registered more than once")
            cost = "estimated: the hook's work (e.g. a gradient reduction) done twice per backward"
            fix = ("register the hook once per parameter (keep its handle and call handle.remove() before "
                   "registering again), or use register_post_accumulate_grad_hook")
            return message, cost, fix
        return KINDS.get(kind, kind), None, None


def _hook_code(fn):
    """What identifies a hook across registrations: the code it runs (through partial objects and bound methods)."""
    for _ in range(8):  # functools.partial (nested at most a few times), as ColossalAI binds its handler
        if not hasattr(fn, "func"):
            break
        fn = fn.func
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None) or getattr(getattr(type(fn), "__call__", None), "__code__", None)
    return code or id(fn)


def _grad_fns(tensor_type, output):
    """The distinct grad_fn nodes of the tensors in a forward's output (tensors, lists, tuples, dicts; 3 levels)."""
    found, seen = [], set()
    stack = [(output, 0)]
    while stack and len(found) < OUTPUT_LIMIT:
        value, depth = stack.pop()
        if isinstance(value, tensor_type):
            node = value.grad_fn
            if node is not None and id(node) not in seen:
                seen.add(id(node))
                found.append(node)
        elif depth < 3:
            if isinstance(value, (list, tuple)):
                stack.extend((v, depth + 1) for v in value[:32])
            elif isinstance(value, dict):
                stack.extend((v, depth + 1) for v in list(value.values())[:32])
    return found


def _first_tensor(tensor_type, args, kwargs):
    """The first tensor a forward received (positional first, then keyword; one level into lists and dicts)."""
    for value in list(args) + (list(kwargs.values()) if kwargs else []):
        if isinstance(value, tensor_type):
            return value
        if isinstance(value, (list, tuple)):
            for item in value[:8]:
                if isinstance(item, tensor_type):
                    return item
        elif isinstance(value, dict):
            for item in list(value.values())[:8]:
                if isinstance(item, tensor_type):
                    return item
    return None


def _has_host_tensor(tensor_type, batch):
    stack = [(batch, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, tensor_type):
            if value.is_cpu:
                return True
        elif depth < 3:
            if isinstance(value, (list, tuple)):
                stack.extend((v, depth + 1) for v in value[:32])
            elif isinstance(value, dict):
                stack.extend((v, depth + 1) for v in list(value.values())[:32])
    return False
