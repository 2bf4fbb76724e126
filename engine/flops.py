"""What a training step costs: analytic model FLOPs of masked-image pretraining, the device's peak
FLOP/s (a table of GPU dense peaks, --peak_tflops, or on CPU a measured matmul), and from both the
MFU of the progress line (engine/reporting/logs.py). benchmarks/ measures against the same count."""
import time
from typing import Dict, Optional, Sequence, Tuple, Union

import torch


# --------------------------------------------------------------------------- model FLOPs
def _hw(img_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(img_size, int):
        return img_size, img_size
    h, w = img_size
    return int(h), int(w)


def mae_forward_flops_per_image(model, mask_ratio: float, img_size) -> Dict[str, int]:
    """Matmul FLOPs (2*m*n*k) of one forward pass for one image, by component.

    See mae_train_flops for what is counted.
    """
    p = model.patch_size
    h, w = _hw(img_size)
    num_patches = (h // p) * (w // p)                       # L
    enc_dim = model.patch_embed.proj.out_channels           # D
    patch_dim = model.patch_embed.proj.in_channels * p * p  # p*p*C
    dec_dim = model.decoder_embed.out_features              # Dd
    t_enc = 1 + int(num_patches * (1 - mask_ratio))         # cls + kept patches, as random_masking
    t_dec = 1 + num_patches                                 # cls + all patches

    def block(blk, tokens: int, dim: int) -> Tuple[int, int]:
        hidden = blk.mlp.fc1.out_features                   # 4*dim for mlp_ratio 4
        linear = 2 * tokens * dim * (3 * dim + dim + 2 * hidden)   # qkv, proj, fc1 + fc2
        attention = 2 * (2 * tokens * tokens * dim)                # QK^T and AV
        return linear, attention

    enc = [block(b, t_enc, enc_dim) for b in model.blocks]
    dec = [block(b, t_dec, dec_dim) for b in model.decoder_blocks]
    return {
        "patch_embed": 2 * num_patches * patch_dim * enc_dim,
        "encoder_linear": sum(lin for lin, _ in enc),
        "encoder_attention": sum(att for _, att in enc),
        "decoder_embed": 2 * t_enc * enc_dim * dec_dim,
        "decoder_linear": sum(lin for lin, _ in dec),
        "decoder_attention": sum(att for _, att in dec),
        "decoder_pred": 2 * t_dec * dec_dim * model.decoder_pred.out_features,
    }


def mae_train_flops(model, batch: int, mask_ratio: float, img_size) -> int:
    """Analytic model FLOPs of one MAE training step (forward + backward) for `batch` images.

    Only matmuls are counted, each as 2*m*n*k; the dimensions are read from the model
    (encoder dim D, depth, decoder dim Dd and depth, patch size p, input channels C, MLP hidden
    width = 4*dim for the registered models). With L = (H/p)*(W/p) patches:

      patch embedding      all L patches:                  2 * L * (p*p*C) * D
      each encoder block   on T_enc = 1 + int(L*(1-mask_ratio)) tokens (cls + kept patches):
                           qkv 3D^2 + proj D^2 + fc1/fc2 8D^2 per token -> 2 * T_enc * 12 D^2
                           attention QK^T and AV, 2 * T_enc^2 * D each  -> 4 * T_enc^2 * D
      decoder_embed        T_enc tokens:                   2 * T_enc * D * Dd
      each decoder block   as an encoder block, on T_dec = 1 + L tokens with width Dd
      decoder_pred         T_dec tokens:                   2 * T_dec * Dd * (p*p*C)

    Training = 3 x forward (the backward pass computes the gradients of both operands of every
    matmul). This is the usual "model FLOPs" convention: layer norms, softmax, GELU, the
    optimizer and the loss are left out, and no attention recomputation is counted. The
    backward of the patch embedding is overcounted by one patch-embedding forward (the images
    need no gradient): 0.4% of the total for ViT-B/16 at 224, 7% for the mini model at 112.
    For ViT-B/16 at 224 with mask ratio 0.75 this is 19.56 GFLOP forward, 58.7 GFLOP per image
    per training step. The forward count equals torch's count of one forward pass term by term
    (counted_forward_flops: convolution, addmm, and attention as the math backend's bmm).
    """
    return 3 * batch * sum(mae_forward_flops_per_image(model, mask_ratio, img_size).values())


def counted_forward_flops(model, images: torch.Tensor, mask_ratio: float,
                          noise: Optional[torch.Tensor] = None) -> Dict[str, int]:
    """torch's FLOP count of one forward pass, per aten op ('aten.addmm': ...).

    Counted with scaled-dot-product attention on its math backend: FlopCounterMode has formulas
    for some fused attention kernels and not others (torch 2.14 counts nothing for the CPU flash
    kernel), and the kernel chosen depends on the torch version, device and shapes. The math
    backend is plain bmm, counted the same everywhere.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images, mask_ratio=mask_ratio, noise=noise)
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def train_flops_per_image(model, mask_ratio: float, input_size: int) -> int:
    """Model FLOPs of one image's training step: mae_train_flops for the official ViT layout, else
    3 x torch's count of one forward pass, taken on the meta device (no memory, no time, no RNG).
    `model` may be on the meta device."""
    if model.plain_vit_mae:
        return mae_train_flops(model, 1, mask_ratio, input_size)
    with torch.device("meta"):
        images = torch.zeros(2, model.in_chans, input_size, input_size)
        noise = torch.zeros(2, model.mask_noise_len_at(input_size))
    return 3 * sum(counted_forward_flops(model, images, mask_ratio, noise).values()) // 2


# --------------------------------------------------------------------------- peaks
# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's data sheets, by the precision the
# training matmuls run in: bf16 / fp16 autocast, or fp32 as TF32. SXM parts; PCIe H100 is listed apart.
PEAK_TFLOPS = {
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7},
}


def precision_name(amp_dtype: Optional[torch.dtype]) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "tf32")


def table_peak_tflops(device_name: str, amp_dtype: Optional[torch.dtype]) -> Optional[float]:
    """The table's peak for a GPU name (the longest matching key), None for a GPU it lacks."""
    matches = [k for k in PEAK_TFLOPS if k in device_name]
    if not matches:
        return None
    return PEAK_TFLOPS[max(matches, key=len)][precision_name(amp_dtype)]


def peak_flops(device: torch.device, amp_dtype: Optional[torch.dtype] = None,
               override_tflops: Optional[float] = None) -> Tuple[Optional[float], str]:
    """(peak FLOP/s per device, where it comes from): --peak_tflops, the GPU table, or on CPU a
    measured matmul in the training precision; (None, why) for a GPU the table lacks."""
    if override_tflops:
        return override_tflops * 1e12, "--peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = table_peak_tflops(name, amp_dtype)
        if tflops is None:
            return None, f"no peak known for {name}: pass --peak_tflops"
        return tflops * 1e12, f"{name} {precision_name(amp_dtype)} dense"
    dtype = amp_dtype or torch.float32
    measured = measure_matmul_peak(device, dtype, size=1024, repeats=3)
    return measured["flops_per_s"], f"measured {dtype} matmul"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: Optional[int] = None,
                        repeats: int = 5) -> Dict[str, float]:
    """Best FLOP/s of a square (size x size) x (size x size) matmul in `dtype` on `device`.

    Two entry points are timed, torch.matmul (a @ b) and F.linear (a @ b.T, the model's
    nn.Linear), and the best of all timings is the peak: on some CPUs one of them has no fast
    kernel for a dtype (fp16 torch.matmul on CPU runs at ~1 GFLOP/s, F.linear at ~50).
    fp32 on CUDA runs with the engine's TF32 setting, like the model's fp32 matmuls.
    """
    if size is None:
        size = 8192 if device.type == "cuda" else 2048
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device, dtype)
    b = torch.randn(size, size, generator=gen).to(device, dtype)
    ops = {"matmul": (torch.matmul, a, b), "linear": (torch.nn.functional.linear, a, b)}
    # Several matmuls per timing on a GPU, so launch and sync overheads vanish.
    per_timing = 10 if device.type == "cuda" else 1
    best, best_op = float("inf"), None
    for name, (op, x, y) in ops.items():
        for _ in range(2):  # warm up (kernel selection, clocks, thread pool)
            op(x, y)
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(per_timing):
                op(x, y)
            sync(device)
            seconds = (time.perf_counter() - t0) / per_timing
            if seconds < best:
                best, best_op = seconds, name
    del a, b, x, y, ops
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"size": size, "op": best_op, "seconds": best, "flops_per_s": 2 * size ** 3 / best}


