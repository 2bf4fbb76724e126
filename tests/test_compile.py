"""torch.compile of the MAE model: same numbers as eager, one graph for every mask."""
import torch
import torch._dynamo

import models


def test_compiled_model_matches_eager_without_recompiling():
    torch.manual_seed(0)
    model = models.create_model("mae_vit_mini_patch16", img_size=32)
    compiled = torch.compile(model)
    torch._dynamo.reset()
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):  # a new mask must not trigger a recompile
        for step in range(3):
            imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 4)
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
