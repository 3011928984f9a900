"""torch.autograd.grad(..., create_graph=True) whose graph of derivatives no later backward uses.

    create-graph-unused   the derivatives were needed as values only (a physics-informed residual, say, that is
                          logged, plotted or checked but never backpropagated), yet create_graph=True built and
                          kept a second autograd graph, and (retain_graph defaults to create_graph) the forward's too

Watches: torch.autograd.grad calls with create_graph=True made by user or framework code (session.on_autograd_grad:
the one wrapper the detectors share), and the graph its results carry (session.track_graph).
Judges: once that graph is freed, or at the end of the run if still alive: never reached by a backward or another
autograd.grad. Silent when a later backward goes through the derivatives (gradient penalty, a PINN residual loss,
MAML's inner step, a second derivative taken from the first) and when no result depends on anything requiring grad.
Cost: measured on the first call at a place: the bytes the derivatives' graph saves for backward beyond what the
forward graph had already saved; the time of the call (median of the calls found).
"""

from __future__ import annotations

from time import perf_counter

from shims.detect import report, tensors
from shims.detect.detector import Detector
from shims.detect.graphs import saved_activation_bytes

CREATE_GRAPH_POSITION = 4  # torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph, create_graph, ...)


class CreateGraph(Detector):
    name = "create-graph"
    kinds = {"create-graph-unused": "torch.autograd.grad(create_graph=True) whose graph of derivatives no later "
                                    "backward used"}
    docs = {  # its rows of docs/detect.md's table (kind: what, count, cost, fix): python -m shims.detect.catalogue
        'create-graph-unused': (
            '`torch.autograd.grad(..., create_graph=True)` whose graph of derivatives no later backward (or '
            'autograd.grad) went through before it was freed or the run ended: the derivatives were needed as values '
            'only (a residual that is logged or checked, never backpropagated); silent when a loss built from them is '
            'backpropagated (gradient penalty, PINN residual loss, a second derivative taken from the first)',
            'calls',
            "measured on the first call at that line: bytes that graph saves beyond the forward graph's; the call's "
            'time (median) and share of the step',
            'drop `create_graph=True` (`retain_graph=True` if a later backward needs the forward)',
        ),
    }
    observes = "torch.autograd.grad(create_graph=True)"
    needs = ("node_prehooks",)

    def install(self):
        self._extra_bytes = {}  # where -> bytes saved by the derivatives' graph beyond the forward's (first call)
        self.session.on_autograd_grad(self, self.grad_called)

    def grad_called(self, args, kwargs, frame):
        """Before an autograd.grad call: returns what to do with its result when it builds a graph."""
        if "create_graph" in kwargs:
            create = kwargs["create_graph"]
        else:
            create = len(args) > CREATE_GRAPH_POSITION and args[CREATE_GRAPH_POSITION]
        session = self.session
        if not create or session.compiling():
            return None
        where = session.sites.caller(frame)
        if where is None:  # torch itself (autograd.functional, checkpointing): not a line the user can change
            return None
        forward_saved = None
        if where not in self._extra_bytes:
            forward_saved = set()  # storages the forward graph saves already: not the derivatives' cost
            outputs = args[0] if args else kwargs.get("outputs")
            saved_activation_bytes(tensors.grad_fns(session.torch.Tensor, outputs), (), forward_saved)
        start = perf_counter()

        def done(result):
            seconds = perf_counter() - start
            if result is None:
                return  # the call raised
            nodes = tensors.grad_fns(session.torch.Tensor, result)
            if not nodes:
                self._extra_bytes.setdefault(where, None)  # measured: nothing (the forward is not walked again)
                return  # no derivative depends on anything that requires grad: no second graph was built
            if forward_saved is not None:
                self._extra_bytes[where] = saved_activation_bytes(nodes, forward_saved)
            session.track_graph(self, nodes, (where, seconds), self.graph_freed)
        return done

    def graph_freed(self, call, reached):
        if not reached:
            where, seconds = call
            self.session.finding("create-graph-unused", where).add(seconds)

    def finish(self):
        for call, reached in self.session.take_alive_graphs(self):
            self.graph_freed(call, reached)

    def describe(self, finding):
        seconds, extra = finding.seconds(), self._extra_bytes.get(finding.where)
        message = (f"torch.autograd.grad(..., create_graph=True) here built a graph of the derivatives that no later "
                   f"backward used ({finding.count} call(s)): they were needed as values only")
        held = (f"{report.size(extra)} saved for backward by the derivatives' graph beyond the forward's (measured on "
                "the first call)") if extra is not None else "a second autograd graph"
        cost = (f"{held}, held as long as the derivatives live, and the forward graph is retained with it "
                f"(retain_graph defaults to create_graph); the call took {report.ms(seconds)} (median, measured, "
                f"recording the graph included){self.session.share(seconds)}")
        fix = ("drop create_graph=True (the derivatives' values are the same); pass retain_graph=True if a later "
               "backward still goes through the same forward. create_graph=True is for derivatives that a loss "
               "backpropagates (gradient penalty, PINN residual loss)")
        return message, cost, fix


DETECTOR = CreateGraph
