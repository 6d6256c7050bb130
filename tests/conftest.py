import os

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. It must be chosen before
# triton is first imported (kernels decide at decoration time).
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# cuBLAS under torch.use_deterministic_algorithms (test_deterministic_algorithms_*) needs a fixed
# workspace on some torch/CUDA versions; read when the first cuBLAS handle is made.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
