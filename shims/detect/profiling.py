"""`python -m shims doctor --profile N` (SHIMS_PROFILE_STEPS=N in detect mode): torch.profiler over N optimizer steps.

Not a detector of mistakes (no kinds, no findings): it rides the session's optimizer-step clock. Off (the default),
install() subscribes to nothing, so it costs nothing. On, counting the steps of the first optimizer that steps:

    step 1              warm-up without the profiler (first-step costs: optimizer state, allocator growth, autotuning)
    step 2              the profiler's own warm-up phase (tracing set up; its events are discarded)
    steps 3 .. N+2      recorded; then the top operators table is printed on stderr, sorted by self device time
                        where a device was traced, else by self CPU time, and the Chrome/Perfetto trace is written
                        next to the JSON report (shims-doctor.json -> shims-doctor.trace.json)
A run that ends first is stopped at exit, saying how many steps were recorded. The profiler only observes: the
training computes exactly what it computes without it (tested bitwise, tests/detect/test_profile.py).
"""

from __future__ import annotations

import os
import sys
import time
import weakref

from shims.detect.detector import Detector

WARMUP_STEPS = 2  # step 1 without the profiler, step 2 in its warm-up phase (docs/detect.md says so too)
TABLE_ROWS = 15
TRACE_SUFFIX = ".trace.json"
_DEVICE_ACTIVITIES = {"cuda": "CUDA", "xpu": "XPU", "mtia": "MTIA", "hpu": "HPU"}  # device type -> ProfilerActivity


class Profile(Detector):
    """Installed by the session after the detectors (shims/detect/__init__.py), never found as one."""
    name = "profile"
    kinds = {}
    observes = ""  # joins the receipt's "observing ..." line only when profiling is on (set in install)

    def install(self):
        config = self.session.engine.config
        self.steps = getattr(config, "profile_steps", None)
        if not self.steps:
            return  # off: no step listener, nothing imported
        from shims.detect.core import TARGET
        self.target = f"{TARGET}.{self.name}"
        profiler = getattr(self.session.torch, "profiler", None)
        absent = [name for name in ("profile", "schedule", "ProfilerActivity") if not hasattr(profiler, name)]
        reason = self.session.api.missing("step_hooks") or (
            f"torch {self.session.torch.__version__} has no torch.profiler.{absent[0]}" if absent else None)
        if reason:
            self._say(f"not profiled: {reason}")
            self.session.record.target(self.target, "skipped", f"--profile {self.steps}: {reason}")
            return
        self.observes = f"torch.profiler over {self.steps} optimizer step(s)"
        self._installed_at = time.time()
        self._clock = None  # weak reference to the optimizer whose steps are counted
        self._seen = 0
        self._profiler = None
        self._done = False
        self.session.on_step(self, self._after_step)

    # ---------------------------------------------------------------- the step clock

    def _after_step(self, optimizer):
        if self._done:
            return
        clock = self._clock() if self._clock is not None else None
        if clock is None:
            self._clock = weakref.ref(optimizer)  # the first optimizer to step (or the next, once it is gone)
        elif clock is not optimizer:
            return  # a second optimizer (a GAN's generator): one iteration counts once
        self._seen += 1
        try:
            if self._seen == WARMUP_STEPS - 1:
                self._start()
            elif self._profiler is not None:
                self._profiler.step()
                if self._at_start is None:  # the warm-up phase is over: recording starts now
                    self._at_start = self._observed_now()
                if self._seen == WARMUP_STEPS + self.steps:
                    self._stop()
        except Exception as exc:  # noqa: BLE001 - the profiler is torch's; say why and leave the run alone
            self._give_up(exc)

    def _start(self):
        torch = self.session.torch
        profiler = torch.profiler
        if _profiler_already_on(torch):
            self._done = True
            why = "another torch profiler is already running in this process (the script's own)"
            self._say(f"not profiled: {why}")
            self.session.record.target(self.target, "skipped", f"--profile {self.steps}: {why}")
            return
        self.device, self.activity_note = self._device_activity(profiler)
        activities = [profiler.ProfilerActivity.CPU]
        if self.device is not None:
            activities.append(getattr(profiler.ProfilerActivity, _DEVICE_ACTIVITIES[self.device]))
        self.trace_path = self._trace_path()
        self._profiler = profiler.profile(activities=activities, schedule=profiler.schedule(
            wait=0, warmup=1, active=self.steps, repeat=1))
        self._profiler.start()
        self._at_start = None  # what the session had observed when recording began (set at the next step)

    def _device_activity(self, profiler):
        """(device type to trace, or None; a note when the device cannot be traced by this torch's profiler)."""
        torch = self.session.torch
        device = self.session.accelerator
        if device is None and torch.cuda.is_available() and torch.cuda.is_initialized():
            device = "cuda"  # no detector saw a training forward: the process still uses CUDA
        if device is None:
            return None, ""
        name = _DEVICE_ACTIVITIES.get(device)
        supported = _supported_activities(profiler)
        if name is None or getattr(profiler.ProfilerActivity, name, None) not in supported:
            return None, f"this torch's profiler cannot trace {device} here: CPU only"
        return device, ""

    def _trace_path(self):
        """Next to the JSON report (name.json -> name.trace.json; a child's name.<pid>.json -> name.<pid>.trace.json),
        else shims-profile.trace.json in the working directory."""
        from shims import config
        report = self.session.engine.report_path()
        if report:
            return os.path.abspath(os.path.splitext(report)[0] + TRACE_SUFFIX)
        name = f"shims-profile.{os.getpid()}" if config.is_child() else "shims-profile"
        return os.path.abspath(name + TRACE_SUFFIX)

    def _child_traces(self):
        """Traces the processes started by this run wrote beside ours (name.<pid>.trace.json) since it started."""
        import glob
        root = self._trace_path()[:-len(TRACE_SUFFIX)]
        found = []
        for path in sorted(glob.glob(f"{glob.escape(root)}.*{TRACE_SUFFIX}")):
            pid = path[len(root) + 1:-len(TRACE_SUFFIX)]
            try:
                if pid.isdigit() and os.path.getmtime(path) >= self._installed_at:
                    found.append(path)
            except OSError:
                continue
        return found

    # ---------------------------------------------------------------- the end: table and trace

    def _stop(self, early=""):
        self._done = True
        profiler, self._profiler = self._profiler, None
        profiler.stop()
        recorded = min(max(self._seen - WARMUP_STEPS, 0), self.steps)
        first = WARMUP_STEPS + 1
        steps = f"optimizer steps {first}-{first + recorded - 1}" if recorded > 1 else f"optimizer step {first}"
        if not recorded:
            why = (f"the run ended after {self._seen} optimizer step(s), within the {WARMUP_STEPS} warm-up steps: "
                   "nothing recorded")
            self._say(f"not profiled: {why}")
            self.session.record.target(self.target, "skipped", f"--profile {self.steps}: {why}")
            return
        events = profiler.key_averages()
        if not len(events):
            why = "torch.profiler recorded nothing (a profiler the script started meanwhile took over)"
            self._say(f"not profiled: {why}")
            self.session.record.target(self.target, "skipped", f"--profile {self.steps}: {why}")
            return
        sort_by, unit = _sort_key(events, self.device)
        inside = self._fell_inside()
        per_step = _per_step_rows(events, recorded, self.device)
        os.makedirs(os.path.dirname(self.trace_path), exist_ok=True)
        profiler.export_chrome_trace(self.trace_path)
        what = f"{steps} ({recorded} of {self.steps} profiled" + (f"; {early}" if early else "") + ")"
        lines = [f"shims doctor --profile {self.steps}: torch.profiler, {what}, after {WARMUP_STEPS} warm-up steps; "
                 f"top {TABLE_ROWS} operators by {unit}" + (f" ({self.activity_note})" if self.activity_note else ""),
                 events.table(sort_by=sort_by, row_limit=TABLE_ROWS).rstrip("\n"),
                 f"per optimizer step (totals / {recorded}): " + "; ".join(
                     f"{r['name']} {r['self_cpu_ms_per_step']:.3f} ms" for r in per_step[:5]),
                 f"inside the window: {inside}",
                 f"trace (chrome://tracing or https://ui.perfetto.dev): {self.trace_path}"]
        self.session.observation.profile = {
            "window": f"{steps} ({recorded} of {self.steps} profiled{'; ' + early if early else ''}), after "
                      f"{WARMUP_STEPS} warm-up steps; inside the window: {inside}",
            "steps": recorded, "operators": per_step[:TABLE_ROWS], "trace": self.trace_path}
        self._say("\n".join(lines))
        self.session.record.target(self.target, "applied", f"--profile {self.steps}: {what}, sorted by {unit}; "
                                                           f"trace: {self.trace_path}")

    def _observed_now(self):
        o = self.session.observation
        return o.evaluations, o.forwards_eval, o.saves

    def _fell_inside(self):
        """What else than training steps fell inside the recorded window (its operators are in the table)."""
        start = self._at_start or self._observed_now()
        evaluations, forwards, saves = (b - a for a, b in zip(start, self._observed_now()))
        parts = []
        if forwards:
            parts.append(f"{evaluations or 'part of an'} evaluation{'s' if evaluations > 1 else ''} ({forwards} "
                         f"forward{'s' if forwards > 1 else ''} in eval mode)")
        if saves:
            parts.append(f"{saves} checkpoint save(s) (torch.save)")
        return ("training steps only (no evaluation, no torch.save)" if not parts else
                ", ".join(parts) + ": their operators are in the table and the per-step averages")

    def finish(self):
        """The run is over: a profile still recording (or still in warm-up) is stopped now, and says so."""
        if not self.steps or getattr(self, "_done", True):
            return
        try:
            if self._profiler is None:
                self._done = True
                from shims import config
                if config.is_child():
                    return  # a DataLoader worker, a launcher's helper: no training here, nothing to say
                children = self._child_traces()
                if children:  # a launcher (mp.spawn, torchrun): its workers printed and wrote their own
                    self.session.record.target(self.target, "applied", f"--profile {self.steps}: no optimizer step "
                                               f"in this process; its workers' traces: {', '.join(children)}")
                    return
                why = "this process made no optimizer step: nothing profiled here"
                self._say(f"not profiled: {why}")
                self.session.record.target(self.target, "skipped", f"--profile {self.steps}: {why}")
                return
            self._stop(early="the run ended first: the recording runs on from the last step to exit")
        except Exception as exc:  # noqa: BLE001
            self._give_up(exc)

    def _give_up(self, exc):
        self._done = True
        profiler, self._profiler = self._profiler, None
        if profiler is not None:
            try:
                profiler.stop()
            except Exception:  # noqa: BLE001 - already failing: the first error is the one to report
                pass
        self._say(f"not profiled: torch.profiler failed: {type(exc).__name__}: {exc}")
        self.session.fail(self, exc)

    def _say(self, text):
        from shims import config
        prefix = f"(pid {os.getpid()}) " if config.is_child() else ""
        sys.stderr.write(f"\n{prefix}{text}\n" if "\n" in text else f"\n[shims] {prefix}--profile: {text}\n")
        sys.stderr.flush()


def _supported_activities(profiler):
    try:
        return set(profiler.supported_activities())
    except Exception:  # noqa: BLE001 - an odd build: assume CPU only
        return {profiler.ProfilerActivity.CPU}


def _profiler_already_on(torch):
    """Whether a torch profiler is running now (starting a second one raises); False where torch cannot say."""
    check = getattr(getattr(torch._C, "_autograd", None), "_profiler_enabled", None)
    try:
        return bool(check()) if check is not None else False
    except Exception:  # noqa: BLE001
        return False


def _per_step_rows(events, steps, device):
    """The operators' totals divided by the steps recorded: calls and self time per optimizer step (ms)."""
    rows = []
    device_attr = None
    if device is not None and len(events):
        device_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else \
            "self_cuda_time_total" if device == "cuda" else None
    for e in events:
        if e.key.startswith("ProfilerStep"):
            continue  # the profiler's own range around each step: the whole step, not an operator
        row = {"name": e.key, "calls_per_step": e.count / steps,
               "self_cpu_ms_per_step": e.self_cpu_time_total / 1000 / steps}
        if device_attr:
            row["self_device_ms_per_step"] = round(getattr(e, device_attr, 0) / 1000 / steps, 4)
        rows.append(row)
    key = "self_device_ms_per_step" if device_attr and any(r.get("self_device_ms_per_step") for r in rows) \
        else "self_cpu_ms_per_step"
    return sorted(rows, key=lambda r: -r.get(key, 0))


def _sort_key(events, device):
    """(attribute to sort the table by, its words): self device time where a device was traced and took time (named
    self_device_time_total in newer torch, self_cuda_time_total in older), else self CPU time."""
    if device is not None and len(events):
        first = events[0]
        name = "self_device_time_total" if hasattr(first, "self_device_time_total") else \
            "self_cuda_time_total" if device == "cuda" else None
        if name is not None and any(getattr(e, name, 0) for e in events):
            return name, f"self {device.upper()} time"
    return "self_cpu_time_total", "self CPU time"

