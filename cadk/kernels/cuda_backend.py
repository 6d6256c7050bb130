"""CUDA backend: the compiled ops of cpp_backend, served by the CUDA kernels of a CUDA build."""
import torch

from . import cpp_backend
from .cpp_backend import bn_gate_act, gate_apply, gated_conv2d, gated_linear, gated_residual  # noqa: F401

AVAILABLE = cpp_backend.AVAILABLE

# Activation dtypes the CUDA kernels compute in (torch.autocast on CUDA takes float16 by default).
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def supports(device) -> bool:
    return torch.device(device).type == "cuda" and cpp_backend.has_kernel("CUDA")
