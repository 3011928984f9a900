"""Training in float32 on a device with tensor cores, with no autocast and no TF32.

    float32-no-autocast   optimizer steps whose forwards ran float32 matmuls or convolutions outside any autocast
                          region, on a device whose matrix units run float16/bfloat16 (CUDA compute capability
                          >= 7.0, or a bfloat16-capable accelerator), with TF32 off for them

Watches: each outermost forward with grad (session.on_forward) and the optimizer steps that follow it.
Judges: per forward, on the device its parameters live on: float32 parameters and outputs, autocast off for that
device type, the module has matmul (Linear, attention, RNN, or mm/bmm/addmm in its graph) or convolution work, and
TF32 does not already put that work on the tensor cores (set_float32_matmul_precision("high"/"medium") or
allow_tf32 for matmuls; cudnn.allow_tf32, on by default, for convolutions; TF32 needs compute capability >= 8.0).
Silent on the CPU, under autocast, with float16/bfloat16 weights, and when TF32 covers the work.
Cost: an estimate: the device's tensor-core over float32 peak ratio (devices.py names the datasheet it comes from),
next to the measured forward time.
"""

from __future__ import annotations

from shims.detect import devices, report, tensors
from shims.detect.detector import Detector

GRAPH_NODES = 4096  # nodes walked, once per module, to find matmuls a module runs without nn.Linear / nn.Conv
_MATMUL = ("Mm", "Addmm", "Bmm", "Baddbmm", "Addbmm", "Matmul", "Linear", "ScaledDotProduct", "Rnn", "Lstm", "Gru",
           "Einsum")


class Float32Training(Detector):
    name = "float32-training"
    kinds = {"float32-no-autocast": "float32 training without autocast on a device with tensor cores (TF32 off)"}
    docs = {  # its rows of docs/detect.md's table (kind: what, count, cost, fix): python -m shims.detect.catalogue
        'float32-no-autocast': (
            'training forwards (followed by an optimizer step) that ran float32 matmuls (`Linear`, attention, RNNs, '
            "or mm/bmm/addmm found in the forward's autograd graph) or convolutions outside any autocast region, "
            'float32 weights and outputs, on a device with tensor cores (CUDA compute capability >= 7.0, or an '
            'accelerator whose torch module says it supports bfloat16), where TF32 does not already cover that work; '
            "reported at the forward's call site; silent under `torch.autocast`, with float16/bfloat16 weights, with "
            'TF32 for matmuls (`set_float32_matmul_precision("high"/"medium")`, `allow_tf32`, or torch 2.9+\'s '
            '`torch.backends.cuda.matmul.fp32_precision = "tf32"`; settings that torch itself cannot tell apart '
            'count as TF32 on) and for convolutions (`cudnn.allow_tf32` / `cudnn.conv.fp32_precision`, on by '
            'default) on compute capability >= 8.0, and on the CPU',
            'optimizer steps',
            "estimated: the device's peak tensor-core throughput over float32 (8x on compute capability 7.x, 16x on "
            '8.0, 4x on 8.6/8.9, 15x on 9.0, from the NVIDIA datasheets of V100, A100, A10, H100, named in the '
            'cost), said to be an upper bound; next to it the measured time of those forwards per step and its share '
            'of the step',
            '`torch.autocast(device, dtype=torch.bfloat16)` (float16 with a `GradScaler` on compute capability 7.x), '
            'or `torch.set_float32_matmul_precision("high")` (TF32)',
        ),
    }
    observes = "float32 forwards on tensor-core devices"
    needs = ("step_hooks",)

    def install(self):
        torch = self.session.torch
        nn = torch.nn
        self._matmul_layers = (nn.Linear, nn.Bilinear, nn.MultiheadAttention, nn.RNNBase)
        self._conv_layers = (nn.modules.conv._ConvNd,)
        self._low = (torch.float16, torch.bfloat16)
        self._cores = {}  # torch.device -> Cores or None
        self._work = {}  # module id -> frozenset of "matmul" / "conv" it runs
        self._step = {}  # where -> [forward seconds this step, module name, work, Cores, device type]
        self._unknown = set()  # device types whose autocast state this torch cannot tell (noted at the end)
        self.session.on_forward(self, self.forward_done)
        self.session.on_step(self, self.step_done)

    def forward_done(self, call):
        module, torch = call.module, self.session.torch
        param = next(module.parameters(), None)
        if param is None or param.dtype != torch.float32 or not tensors.on_accelerator(param):
            return
        device = param.device
        cores = self._cores.get(device, False)
        if cores is False:
            cores = self._cores[device] = devices.tensor_cores(torch, device)
        if cores is None:
            return
        try:
            if devices.autocast_dtype(torch, device.type) in self._low:
                return
        except LookupError:
            self._unknown.add(device.type)  # cannot tell whether autocast is on: noted, never guessed
            return
        if any(t.dtype in self._low for t in tensors._walk(call.output, torch.Tensor, limit=8, depth=2)):
            return  # the forward enters autocast itself (or casts): its outputs are float16/bfloat16
        work = self._work.get(id(module))
        if work is None:
            work = self._work[id(module)] = self._module_work(module, call.nodes)
        if cores.tf32:  # TF32 puts float32 work on the tensor cores: only what it leaves out counts
            work = work - {"matmul"} if devices.matmul_tf32(torch) else work
            work = work - {"conv"} if device.type == "cuda" and devices.conv_tf32(torch) else work
        if not work:
            return
        where = call.where
        if where is None:
            return
        pending = self._step.get(where)
        if pending is None:
            self._step[where] = [call.seconds, type(module).__name__, work, cores, device.type]
        else:
            pending[0] += call.seconds

    def _module_work(self, module, nodes):
        """{"matmul", "conv"}: the matrix work this module's forward runs (its layers, else its autograd graph)."""
        work = set()
        for layer in module.modules():
            if isinstance(layer, self._matmul_layers):
                work.add("matmul")
            elif isinstance(layer, self._conv_layers):
                work.add("conv")
        if work:
            return frozenset(work)
        seen, stack = set(), list(nodes)
        while stack and len(seen) < GRAPH_NODES:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            name = type(node).__name__
            if "Convolution" in name:
                work.add("conv")
            elif any(part in name for part in _MATMUL):
                work.add("matmul")
            stack.extend(next_node for next_node, _ in node.next_functions)
        return frozenset(work)

    def step_done(self, optimizer):
        for where, (seconds, module, work, cores, device_type) in self._step.items():
            found = self.session.finding("float32-no-autocast", where)
            found.add(seconds)
            found.info.update(module=module, work=work, cores=cores, device=device_type)
        self._step.clear()

    def finish(self):
        for device_type in sorted(self._unknown):
            self.session.record.note(f"float32-training: torch {self.session.torch.__version__} cannot tell whether "
                                     f"autocast is on for {device_type}: its forwards were not judged")

    def describe(self, finding):
        info, session = finding.info, self.session
        cores, device = info["cores"], info["device"]
        work = " and ".join(sorted(("matmuls" if w == "matmul" else "convolutions") for w in info["work"]))
        message = (f"{info['module']} forward here ran float32 {work} outside autocast in {finding.count} optimizer "
                   f"step(s), on a {device} device with tensor cores ({cores.name}) that float32 leaves idle")
        seconds = finding.seconds()
        measured = (f"; these forwards took {report.ms(seconds)} per step (measured){session.share(seconds)}"
                    if seconds is not None else "")
        if cores.ratio:
            tf32 = f", TF32 about {cores.tf32_ratio}x" if cores.tf32_ratio else ""
            cost = (f"estimated: {cores.low} on the tensor cores peaks at about {cores.ratio}x the float32 "
                    f"throughput of these {work}{tf32} ({cores.source}); the step gains less, since memory-bound "
                    f"work only gains from halving bytes{measured}")
        else:
            cost = (f"estimated: the {cores.low} matrix units outrun float32 by a large factor (no peak ratio on file "
                    f"for {cores.name}){measured}")
        scaler = " with a GradScaler" if cores.low == "float16" else ""
        fix = (f"run the forward and loss under torch.autocast(\"{device}\", dtype=torch.{cores.low}){scaler}"
               + ("; or, staying in float32, torch.set_float32_matmul_precision(\"high\") (TF32 matmuls; "
                  "convolutions: torch.backends.cudnn.allow_tf32 = True)" if cores.tf32 else ""))
        return message, cost, fix


DETECTOR = Float32Training
