"""CUDA tests, run by the device check (scripts/gpu_check.sh -> benchmarks/gpu_check.py: `pytest -m gpu`,
which also takes the CUDA cases of other files, e.g. tests/test_compile.py). Each skips without a GPU; the 2-GPU test
also without a second one.

What only a GPU proves: autocast numerics (bf16 and fp16) against fp32, the fp16 gradient
scaler with fused AdamW, fused AdamW on CUDA, nvjpeg decoding, nccl,
bit-identical resume after kill -9 with deterministic algorithms, FSDP2 on nccl, the non-finite stop,
and the progress line's CUDA memory peak.
"""
import re
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import models

from conftest import MINI, PHOTOS, REPO, assert_ok, cli_env, main_cmd, make_image_folder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
GPU = [*MINI, "--num_workers", 2]  # later flags win: loader workers keep the GPU fed
GPU_RUN = [*GPU, "--device", "cuda", "--batch_size", 2, "--epochs", 2, "--save_every_steps", 2, "--print_freq", 1]


def build(name="mae_vit_mini_patch16", size=64):
    torch.manual_seed(0)
    return models.create_model(name, "pretrain", img_size=size).to(CUDA)


def batch(model, n=4, size=64):
    g = torch.Generator(device="cpu").manual_seed(1)
    imgs = torch.randn(n, 3, size, size, generator=g).to(CUDA)
    return imgs, torch.rand(n, model.mask_noise_len, generator=g).to(CUDA)


@pytest.fixture(scope="module")
def photos_gpu(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("gpu_photos"))


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("name, size", [("mae_vit_mini_patch16", 64), ("mixmim_mini", 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_step_agrees_with_fp32(name, size, dtype):
    """Loss within the dtype's rounding of the fp32 loss, gradients pointing the same way."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = build(name, size)
    imgs, noise = batch(model, 4, size)
    scale = 1024.0 if dtype is torch.float16 else 1.0  # what the GradScaler does, so fp16 grads do not underflow

    def loss_and_grads(amp):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(imgs, mask_ratio=model.default_mask_ratio, noise=noise)[0]
        (loss * scale).backward()
        grads = torch.cat([p.grad.flatten().float() / scale for p in model.parameters() if p.grad is not None])
        return loss.detach().float(), grads

    loss32, grads32 = loss_and_grads(None)
    loss_amp, grads_amp = loss_and_grads(dtype)
    assert loss_amp.dtype == torch.float32 and torch.isfinite(loss_amp)
    rel = 2e-2 if dtype is torch.bfloat16 else 5e-3
    assert abs(loss_amp - loss32) <= rel * loss32, (loss_amp.item(), loss32.item())
    assert torch.isfinite(grads_amp).all()
    assert F.cosine_similarity(grads32, grads_amp, dim=0) > 0.99


def test_fp16_grad_scaler_skips_an_overflowing_step_and_recovers():
    """The engine's step (fused AdamW, unscale, grad norm, scaler step) under fp16: a scale so large
    that the gradients overflow skips the step without touching the weights, halves the scale, and
    training goes on once the scale fits."""
    from engine.optim import adamw
    from engine.trainer import grad_total_norm

    model = build()
    imgs, noise = batch(model)
    opt = adamw(model.parameters(), 1e-3, CUDA, betas=(0.9, 0.95))
    assert opt.defaults["fused"] is True
    params = list(model.parameters())
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 30)
    start = [p.detach().clone() for p in params]
    skipped = taken = 0
    for step in range(40):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(imgs, mask_ratio=0.75, noise=noise)[0]
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        norm = grad_total_norm(params, None)
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if scaler.get_scale() < before:
            skipped += 1
            assert not torch.isfinite(norm)
            if step == 0:
                assert all(torch.equal(p, s) for p, s in zip(params, start))
        else:
            taken += 1
    assert skipped >= 1 and taken >= 10, (skipped, taken)
    assert all(torch.isfinite(p).all() for p in params)
    assert not all(torch.equal(p, s) for p, s in zip(params, start))
    assert torch.isfinite(loss)


def test_fused_adamw_equals_foreach_on_cuda():
    from engine.optim import adamw

    torch.manual_seed(0)
    params = [torch.randn(s, device=CUDA, requires_grad=True) for s in ((64, 32), (32,), (7, 3, 5))]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    fused = adamw([{"params": params, "weight_decay": 0.05}], 1e-2, CUDA, betas=(0.9, 0.95))
    foreach = torch.optim.AdamW([{"params": twins, "weight_decay": 0.05}], lr=1e-2, betas=(0.9, 0.95), foreach=True)
    assert fused.defaults["fused"] is True
    for _ in range(5):
        for p, t in zip(params, twins):
            g = torch.randn_like(p)
            p.grad, t.grad = g.clone(), g.clone()
        fused.step()
        foreach.step()
    for p, t in zip(params, twins):
        torch.testing.assert_close(p, t, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- data
def test_device_decode_with_nvjpeg_matches_the_cpu_decode(tmp_path):
    """Same crop boxes and flips (drawn in the workers), pixels within a few grey levels: nvjpeg's
    IDCT and chroma upsampling and the float resize differ slightly from libjpeg-turbo + uint8."""
    from engine.data import KeyedSamples, build_loader, image_folder, pretrain_transform

    root = tmp_path / "train" / "c"
    root.mkdir(parents=True)
    for path in sorted(PHOTOS.glob("*.jpg"))[:8]:
        (root / path.name).write_bytes(path.read_bytes())
    ds = KeyedSamples(image_folder(str(tmp_path), "train"), pretrain_transform(224, "device_decode"), 0, 196,
                      "device_decode", torch_rng_only=True)
    loader = build_loader(ds, 8, 1, 0, 0, 0, True)
    loader.set_position(0)
    encoded = next(iter(loader))[0]
    on_gpu = encoded.decode(CUDA)
    on_cpu = encoded.decode(torch.device("cpu"))
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.uint8 and on_gpu.shape == (8, 3, 224, 224)
    diff = (on_gpu.cpu().int() - on_cpu.int()).abs().float()
    assert diff.mean() < 2.0, diff.mean()
    assert torch.quantile(diff.flatten()[::7], 0.99) <= 12, torch.quantile(diff.flatten()[::7], 0.99)


# ----------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nccl_ddp_step_on_one_gpu():
    """A process group with the nccl backend and a DDP step of the MAE on one GPU: the all-reduced
    gradients of a 1-rank group equal the plain backward."""
    script = textwrap.dedent("""
        import torch, torch.distributed as dist
        import models
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
        torch.manual_seed(0)
        model = models.create_model("mae_vit_mini_patch16", "pretrain", img_size=64).cuda()
        twin = models.create_model("mae_vit_mini_patch16", "pretrain", img_size=64).cuda()
        twin.load_state_dict(model.state_dict())
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
        imgs, noise = torch.randn(4, 3, 64, 64, device="cuda"), torch.rand(4, 16, device="cuda")
        ddp(imgs, mask_ratio=0.75, noise=noise)[0].backward()
        twin(imgs, mask_ratio=0.75, noise=noise)[0].backward()
        for (n, a), b in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=n)
        t = torch.ones(3, device="cuda")
        dist.all_reduce(t)
        assert dist.get_backend() == "nccl" and t.tolist() == [1.0, 1.0, 1.0]
        dist.destroy_process_group()
        print("nccl ok")
    """)
    env = dict(cli_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "nccl ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


def run_cli(args, nproc=1, timeout=600):
    return subprocess.run(main_cmd("main_pretrain.py", args, nproc), cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def uninterrupted_gpu(photos_gpu, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_uninterrupted")
    proc = run_cli([*GPU_RUN, "--deterministic", "--data_path", photos_gpu, "--output_dir", out])
    assert_ok(proc)
    return out, proc


def test_kill9_on_gpu_resumes_bit_identical(photos_gpu, uninterrupted_gpu, tmp_path):
    from test_resume import assert_identical, run_and_kill

    reference, _ = uninterrupted_gpu
    args = [*GPU_RUN, "--deterministic", "--data_path", photos_gpu, "--output_dir", tmp_path]
    run_and_kill(args, r"Epoch: \[1\]  \[3/7\]", timeout=600)
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and 0 < ckpt["epoch_iter"] < 7
    assert_ok(run_cli(args))
    assert_identical(reference / "checkpoint-last.pth", tmp_path / "checkpoint-last.pth")


def test_fsdp_on_nccl_matches_ddp_and_writes_a_sharded_checkpoint(photos_gpu, uninterrupted_gpu, tmp_path):
    """FSDP2 on one GPU (nccl, bf16 autocast as DDP's): the same run as the DDP reference within
    bf16 kernel noise, its checkpoint a DCP directory that reads back whole."""
    from test_fsdp import max_diff

    reference, _ = uninterrupted_gpu
    assert_ok(run_cli([*GPU_RUN, "--deterministic", "--dist_strategy", "fsdp", "--data_path", photos_gpu,
                       "--output_dir", tmp_path]))
    last = tmp_path / "checkpoint-last"
    assert last.is_dir() and (last / "COMPLETE").exists()
    assert max_diff(reference / "checkpoint-last.pth", last) <= 1e-3


def test_progress_line_reports_the_cuda_memory_peak(uninterrupted_gpu):
    """'max mem' is torch.cuda.max_memory_allocated: tens of MB for the mini model, where the
    process's resident memory (the CPU figure) is over a GB with CUDA loaded."""
    from util.meters import max_memory_mb

    _, proc = uninterrupted_gpu
    peaks = [int(m) for m in re.findall(r"max mem: (\d+)MB", proc.stdout)]
    assert peaks and 0 < max(peaks) < 1000, peaks
    torch.cuda.reset_peak_memory_stats()
    x = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=CUDA)
    assert max_memory_mb(CUDA) == torch.cuda.max_memory_allocated(CUDA) / 2 ** 20 >= 256
    del x


def test_nonfinite_loss_stops_on_gpu(photos_gpu, tmp_path):
    base = [*GPU, "--device", "cuda", "--batch_size", 7, "--data_path", photos_gpu, "--output_dir", tmp_path,
            "--print_freq", 1]
    assert_ok(run_cli([*base, "--epochs", 1]))
    last = tmp_path / "checkpoint-last.pth"
    before = last.read_bytes()
    proc = run_cli([*base, "--epochs", 3, "--lr", "1e30"])
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert re.fullmatch(r"error: loss is not finite at epoch 1, iteration 1: training stopped; the last "
                        r"checkpoint is intact .*", proc.stderr.strip().splitlines()[-1])
    assert last.read_bytes() == before


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_nccl_run_equals_one_gpu_with_the_same_global_batch(photos_gpu, tmp_path):
    common = [*GPU, "--device", "cuda", "--epochs", 2, "--data_path", photos_gpu]
    assert_ok(run_cli([*common, "--batch_size", 4, "--output_dir", tmp_path / "one"]))
    assert_ok(run_cli([*common, "--batch_size", 2, "--output_dir", tmp_path / "two"], nproc=2))
    a = torch.load(tmp_path / "one" / "checkpoint-last.pth", map_location="cpu", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "checkpoint-last.pth", map_location="cpu", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5, msg=k)

