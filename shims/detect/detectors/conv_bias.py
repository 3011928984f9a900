"""A convolution with a bias whose output goes straight into BatchNorm (the profiler pattern matcher's
Conv2dBiasFollowedByBatchNorm2dPattern, torch 2.0-2.x).

    conv-bias-batchnorm   BatchNorm normalising with batch statistics subtracts each channel's mean, so a per-channel
                          bias added just before it cancels exactly: parameters, gradients, optimizer state and one
                          addition per output element, all wasted

Watches: every module forward (session.on_module_output): the output tensor of each Conv1d/2d/3d or ConvTranspose
with a bias, and the input of each BatchNorm1d/2d/3d (or SyncBatchNorm); the construction of convolutions
(_ConvNd.__init__, wrapped) for the place to report.
Judges: from the data flow itself, not from module order: a BatchNorm using batch statistics (train mode, or no
running statistics) received the very tensor a convolution with a bias returned, unmodified since (its version
counter unchanged: an in-place ReLU in between is no finding). Silent on bias=False, on conv -> ReLU -> BN, and on a
BatchNorm in eval mode with running statistics.
Cost: the bias parameters wasted (counted) and the additions per forward (the convolution's output size, measured).
Reported where the convolution was constructed (where bias=False goes), else where the forward runs the BatchNorm.
"""

from __future__ import annotations

import sys
import weakref

from shims.detect import report, sites
from shims.detect.detector import Detector

RECENT_OUTPUTS = 64  # conv outputs remembered until a BatchNorm takes them (a forward rarely has more in flight)
CONV, BATCHNORM = 1, 2


class ConvBias(Detector):
    name = "conv-bias"
    kinds = {"conv-bias-batchnorm": "a convolution with a bias feeding straight into BatchNorm, which cancels the "
                                    "bias"}
    docs = {  # its rows of docs/detect.md's table (kind: what, count, cost, fix): python -m shims.detect.catalogue
        'conv-bias-batchnorm': (
            'a `Conv1d/2d/3d` (or `ConvTranspose`) with a bias whose output tensor, unmodified, is the input of a '
            "`BatchNorm1d/2d/3d` using batch statistics, seen in the data flow at run time (the profiler's "
            "`Conv2dBiasFollowedByBatchNorm2dPattern`): BatchNorm subtracts each channel's mean, cancelling the "
            "bias; reported at the convolution's construction, else at the line running the BatchNorm; silent on "
            '`bias=False`, conv -> ReLU -> BN (in place too) and BatchNorm in eval mode',
            'convolutions',
            'bias parameters wasted (counted), additions per forward (measured output size)',
            '`bias=False`',
        ),
    }
    observes = "convolutions feeding BatchNorm"

    def install(self):
        nn, session = self.session.torch.nn, self.session
        self._conv_type, self._batchnorm_type = nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm
        self._tensor_type = session.torch.Tensor
        self._roles = {}  # module type -> CONV, BATCHNORM or 0
        self._outputs = {}  # id(conv output) -> (weak reference to it, its version, weak reference to the conv)
        self._found = weakref.WeakSet()  # convolutions already reported
        self._defined = weakref.WeakKeyDictionary()  # convolution -> where it was constructed
        session.wrap(self._conv_type, "__init__", sites.after_construction(self, self._remember_definition))
        session.on_module_output(self, self.module_ran)

    def _remember_definition(self, conv, where):
        if where is not None:
            self._defined[conv] = where

    def _role(self, module_type):
        role = self._roles.get(module_type)
        if role is None:
            role = self._roles[module_type] = CONV if issubclass(module_type, self._conv_type) else \
                BATCHNORM if issubclass(module_type, self._batchnorm_type) else 0
        return role

    def module_ran(self, module, args, output):
        role = self._role(type(module))
        if role == CONV:
            if module.bias is not None and isinstance(output, self._tensor_type) and module not in self._found:
                self._remember(module, output)
        elif role == BATCHNORM and self._outputs and args:
            if module.training or module.running_mean is None:  # what BatchNorm itself checks: batch statistics
                self._batchnorm_input(module, args[0])

    def _remember(self, conv, output):
        try:
            version = output._version
        except RuntimeError:  # an inference tensor has no version counter: an in-place change could not be seen
            return
        outputs = self._outputs
        if len(outputs) >= RECENT_OUTPUTS:
            del outputs[next(iter(outputs))]  # the oldest
        outputs[id(output)] = (weakref.ref(output), version, weakref.ref(conv))

    def _batchnorm_input(self, batchnorm, tensor):
        entry = self._outputs.pop(id(tensor), None)
        if entry is None or entry[0]() is not tensor or tensor._version != entry[1]:
            return  # not a conv output, or changed in place since (conv -> in-place ReLU -> BN)
        conv = entry[2]()
        if conv is None or conv in self._found:
            return
        self._found.add(conv)
        where = self._defined.get(conv) or self.session.where(sys._getframe(1))  # else: the line running the BN
        if where is None:
            return
        found = self.session.finding("conv-bias-batchnorm", where)
        found.count += 1
        info = found.info
        info["parameters"] = info.get("parameters", 0) + conv.bias.numel()
        info["additions"] = info.get("additions", 0) + tensor.numel()
        info["pair"] = f"{type(conv).__name__} -> {type(batchnorm).__name__}"

    def describe(self, finding):
        info = finding.info
        message = (f"{info.get('pair')}: {finding.count} convolution(s) built here add a bias that the BatchNorm they "
                   "feed straight into cancels (it subtracts each channel's batch mean)")
        cost = (f"{info.get('parameters')} bias parameters that cannot learn anything (counted; their gradients are "
                f"~0; Adam-style optimizers keep state for them), and {info.get('additions')} additions per forward at "
                "the observed batch size (measured output size; small next to the convolution)")
        fix = ("bias=False on the convolution (to load a checkpoint trained with the bias, subtract conv.bias from "
               "the BatchNorm's running_mean)")
        return message, cost, fix


DETECTOR = ConvBias
