"""What detect mode asks about the accelerator itself: its tensor cores, its free memory, the autocast state, which
optimizer implementation torch picks for it. One place, read-only (nothing here changes torch's state).

Detectors call these through the module (`devices.tensor_cores(...)`), so tests on a machine without an accelerator
can answer for one (tests/detect/test_accelerator.py), as `tensors.on_accelerator` lets CPU tensors stand in.
"""

from __future__ import annotations

from collections import namedtuple

# What the device's matrix units offer: `low` the reduced-precision dtype they run ("bfloat16" or "float16"),
# `tf32` whether float32 matmuls/convolutions can use them (TF32), `ratio`/`tf32_ratio` the peak dense throughput
# against float32 (None: none on file), `source` where those ratios come from.
Cores = namedtuple("Cores", "name low tf32 ratio tf32_ratio source")

# NVIDIA compute capability (major, minor floor) -> (low dtype, TF32, ratio, TF32 ratio, reference GPU and its dense
# peak TFLOPS from its datasheet: float16/bfloat16 tensor / TF32 tensor / float32)
_NVIDIA = (
    ((9, 0), ("bfloat16", True, 15, 7, "H100 SXM datasheet: 989 / 495 / 67 TFLOPS")),
    ((8, 6), ("bfloat16", True, 4, 2, "A10 datasheet: 125 / 62.5 / 31.2 TFLOPS (L4, RTX 30/40 alike)")),
    ((8, 0), ("bfloat16", True, 16, 8, "A100 datasheet: 312 / 156 / 19.5 TFLOPS")),
    ((7, 0), ("float16", False, 8, None, "V100 datasheet: 125 / - / 15.7 TFLOPS (T4: 65 / - / 8.1)")),
)


def tensor_cores(torch, device):
    """Cores of `device` (a torch.device) when it has matrix units for float16/bfloat16, else None: CUDA compute
    capability >= 7.0, or another accelerator whose torch module says it supports bfloat16. Never the CPU."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = f"compute capability {major}.{minor}"
        if getattr(torch.version, "hip", None):  # ROCm: matrix cores on CDNA and RDNA3; no ratios on file
            bf16 = torch.cuda.is_bf16_supported()
            return Cores(f"ROCm {name}", "bfloat16" if bf16 else "float16", False, None, None, None) \
                if major >= 9 else None
        if major < 7:
            return None
        if major >= 10:  # newer than the table: tensor cores, ratios not on file
            return Cores(name, "bfloat16", True, None, None, None)
        for floor, (low, tf32, ratio, tf32_ratio, source) in _NVIDIA:
            if (major, minor) >= floor:
                return Cores(name, low, tf32, ratio, tf32_ratio, source)
        return None
    if device.type in ("cpu", "mps", "meta"):
        return None
    supported = getattr(getattr(torch, device.type, None), "is_bf16_supported", None)
    if supported is not None and supported():
        return Cores(device.type, "bfloat16", False, None, None, None)
    return None


def matmul_tf32(torch):
    """Whether float32 matmuls may use TF32: torch.backends.cuda.matmul.fp32_precision (torch 2.9+, "none" inherits
    torch.backends.fp32_precision), else set_float32_matmul_precision("high"/"medium") or allow_tf32."""
    matmul = getattr(getattr(torch.backends, "cuda", None), "matmul", None)
    decided = _fp32_precision(matmul, torch.backends)
    if decided is not None:
        return decided
    try:
        precision = getattr(torch, "get_float32_matmul_precision", None)
        if precision is not None and precision() != "highest":
            return True
        return bool(getattr(matmul, "allow_tf32", False))
    except RuntimeError:  # torch 2.9+ raises when the legacy and the new settings were mixed: cannot tell
        return True  # assume TF32 on: no finding rather than a wrong one


def conv_tf32(torch):
    """Whether float32 convolutions may use TF32: torch.backends.cudnn.conv.fp32_precision (torch 2.9+), else
    torch.backends.cudnn.allow_tf32 (on by default)."""
    cudnn = getattr(torch.backends, "cudnn", None)
    decided = _fp32_precision(getattr(cudnn, "conv", None), cudnn)
    if decided is not None:
        return decided
    try:
        return bool(getattr(cudnn, "allow_tf32", False))
    except RuntimeError:  # mixed legacy and new settings (torch 2.9+): cannot tell
        return True


def _fp32_precision(backend, parent):
    """True/False from the fp32_precision setting of torch 2.9+ ("tf32" / "ieee"; "none" defers to the parent's),
    None where it is absent or leaves the choice to the legacy flags."""
    for holder in (backend, parent):
        try:
            value = getattr(holder, "fp32_precision", None)
        except (AssertionError, RuntimeError):  # torch 2.0's backends.cuda.matmul asserts on unknown attributes
            value = None
        if value == "tf32":
            return True
        if value == "ieee":
            return False
    return None


def autocast_dtype(torch, device_type):
    """The dtype autocast runs in for `device_type` right now, None when autocast is off there. Raises LookupError
    when this torch cannot say (an old torch and a device type without its own autocast query)."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4: one query for every device type
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    enabled = getattr(torch, f"is_autocast_{device_type}_enabled", None)
    dtype = getattr(torch, f"get_autocast_{device_type}_dtype", None)
    if enabled is None or dtype is None:
        raise LookupError(f"torch {torch.__version__} has no autocast query for {device_type}")
    return dtype() if enabled() else None


def free_memory(torch, device):
    """Free bytes on `device` now (the device's own count, e.g. cudaMemGetInfo), or None when it cannot be asked."""
    if device.type == "cpu":
        return None
    query = getattr(getattr(torch, device.type, None), "mem_get_info", None)
    if query is None:
        return None
    try:
        return query(device)[0]
    except Exception:  # noqa: BLE001 - a backend that cannot answer: unknown
        return None


def default_implementation(torch, params, differentiable):
    """What a torch optimizer with foreach=None and fused=None runs on these parameters, asking torch's own rule
    (torch.optim.optimizer._default_to_fused_or_foreach, torch 2.0+): "foreach" or "for-loop"; None when this torch
    has no such rule."""
    from torch.optim import optimizer
    rule = getattr(optimizer, "_default_to_fused_or_foreach", None)
    if rule is None:
        return None
    fused, foreach = rule(list(params), bool(differentiable), use_fused=False)
    return "fused" if fused else "foreach" if foreach else "for-loop"


def fused_devices(torch):
    """Accelerator device types with fused optimizer kernels in this torch (["cuda"] where torch cannot say; the
    CPU's own fused kernels are left out: detect mode judges optimizers of accelerators only)."""
    try:
        from torch.utils import _foreach_utils
        return [name for name in _foreach_utils._get_fused_kernels_supported_devices() if name != "cpu"]
    except (ImportError, AttributeError):
        return ["cuda"]
