"""Numerics of a training process: the autocast precision and the backend switches (TF32,
cuDNN autotuning, deterministic kernels)."""
import os
from contextlib import nullcontext

import torch


def resolve_amp(amp, device: torch.device):
    """--amp -> autocast dtype (None: full fp32)."""
    if amp is None:
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def autocast(device: torch.device, amp_dtype, cache: bool = True):
    """torch.autocast for the dtype resolve_amp chose; a no-op context for fp32.

    cache=False: no bf16 copy of a weight outlives its use. Autocast caches the cast of every
    leaf parameter until the forward pass ends, and FSDP's gathered weights are such leaves: the
    cache would keep the whole model in bf16 on every rank (13 GB for ViT-6.5B), undoing the
    resharding after each block. Each weight is used once per forward, so nothing is cast twice."""
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype, cache_enabled=cache)


def configure_backends(device: torch.device, deterministic: bool = False) -> None:
    """cuDNN autotuning and TF32 matmuls on CUDA (fp32 training at tensor-core speed).

    deterministic (--deterministic): the same inputs give the same bits on the GPU, so a resumed
    run equals an uninterrupted one there too, as it does on the CPU. Deterministic kernels
    (atomics-free scatter/gather backward and attention backward, fixed cuBLAS workspaces), and no
    cuDNN autotuning, whose choice may differ between processes. Slower; for checks and debugging.
    """
    if deterministic:
        # cuBLAS reads this when its first handle is made; setup_runtime calls this before any CUDA work.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
