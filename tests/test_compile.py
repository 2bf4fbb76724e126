"""torch.compile of the MAE model: same numbers as eager, one graph for every mask."""
import pytest
import torch
import torch._dynamo

import models

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_compiled_model_matches_eager_without_recompiling(device):
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on both sides of the comparison
    torch.manual_seed(0)
    model = models.create_model("mae_vit_mini_patch16", img_size=32).to(device)
    compiled = torch.compile(model)
    torch._dynamo.reset()
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):  # a new mask must not trigger a recompile
        for _ in range(3):
            imgs, noise = torch.randn(4, 3, 32, 32, device=device), torch.rand(4, 4, device=device)
            loss_c, pred_c, mask_c = compiled(imgs, mask_ratio=0.75, noise=noise)
            loss_e, pred_e, mask_e = model(imgs, mask_ratio=0.75, noise=noise)
            assert torch.equal(mask_c, mask_e)
            torch.testing.assert_close(pred_c, pred_e, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
            grads_e = torch.autograd.grad(loss_e, [model.cls_token, model.decoder_pred.weight])
            grads_c = torch.autograd.grad(loss_c, [model.cls_token, model.decoder_pred.weight])
            for ge, gc in zip(grads_e, grads_c):
                torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before >= 1


def test_compiled_model_matches_eager_under_bf16_autocast():
    """The bf16 training path: compiled and eager agree within bf16 rounding, and both stay close
    to the fp32 loss (so the comparison is not between two equally broken results)."""
    torch.manual_seed(0)
    model = models.create_model("mae_vit_mini_patch16", img_size=32)
    compiled = torch.compile(model)
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 4)
    with torch.no_grad():
        loss_fp32 = model(imgs, mask_ratio=0.75, noise=noise)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_c, pred_c, _ = compiled(imgs, mask_ratio=0.75, noise=noise)
            loss_e, pred_e, _ = model(imgs, mask_ratio=0.75, noise=noise)
    assert pred_e.dtype == torch.bfloat16 and pred_c.dtype == torch.bfloat16
    torch.testing.assert_close(pred_c.float(), pred_e.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss_c.float(), loss_e.float(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(loss_e.float(), loss_fp32, rtol=2e-2, atol=1e-3)
