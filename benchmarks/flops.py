"""What the benchmark measures against: analytic MAE model FLOPs, the device's matmul peak, and
the CPU time other processes take while a CPU benchmark runs."""
import os
import platform
import resource
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


def counted_forward_flops(model, images: torch.Tensor, mask_ratio: float) -> Dict[str, int]:
    """torch's FLOP count of one forward pass, per aten op ('aten.addmm': ...).

    Counted with scaled-dot-product attention on its math backend: FlopCounterMode has formulas
    for some fused attention kernels and not others (torch 2.14 counts nothing for the CPU flash
    kernel), and the kernel chosen depends on the torch version, device and shapes. The math
    backend is plain bmm, counted the same everywhere.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images, mask_ratio=mask_ratio)
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


# --------------------------------------------------------------------------- device helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CpuShare:
    """CPU time used by other processes (and stolen by the hypervisor) while a region runs.

    On CPU the benchmark's numbers are only meaningful on an otherwise idle machine; this
    reads /proc/stat (Linux) before and after and subtracts the CPU time of this process and its
    children (loader workers).
    The results are average numbers of cores; None where /proc/stat cannot be read.
    """

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat", encoding="utf-8") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
        steal = fields[7] if len(fields) > 7 else 0
        own = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                     resource.getrusage(resource.RUSAGE_CHILDREN)))
        return (time.perf_counter(), (user + nice + system + irq + softirq) / tick, steal / tick,
                own + CpuShare._live_descendants_cpu() / tick)

    @staticmethod
    def _live_descendants_cpu() -> int:
        """CPU ticks of this process's live descendants (data loader workers count as our own)."""
        parent, ticks = {}, {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                parent[int(entry)] = int(fields[1])
                ticks[int(entry)] = int(fields[11]) + int(fields[12])  # utime + stime
        mine, total = {os.getpid()}, 0
        for pid in sorted(parent):  # children have larger pids than their parents, nearly always
            if parent[pid] in mine and pid not in mine:
                mine.add(pid)
                total += ticks[pid]
        return total

    def stop(self) -> Dict[str, Optional[float]]:
        end = self._read()
        if self.start is None or end is None:
            return {"other_processes_cores": None, "steal_cores": None, "own_cores": None}
        wall = end[0] - self.start[0]
        busy, steal, own = (end[i] - self.start[i] for i in (1, 2, 3))
        return {"other_processes_cores": max(busy - own, 0.0) / wall, "steal_cores": steal / wall,
                "own_cores": own / wall}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name


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


