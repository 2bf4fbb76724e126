"""Optimizer parameter groups and the LARS optimizer of the official linear-probing recipe."""
import torch
from timm.optim import param_groups_layer_decay


def adamw(param_groups, lr: float, device: torch.device, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW with the fused kernel on CUDA and CPU: one pass over the parameters instead of
    foreach's several. On the 2-core CPU it takes 0.055 s per ViT-B step against 0.3-0.4 s."""
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=device.type in ("cuda", "cpu"))


def param_groups_lrd(model, weight_decay=0.05, no_weight_decay_list=(), layer_decay=.75):
    """Layer-wise lr decay groups (BEiT / official MAE rule), each with an `lr_scale`.

    cls_token, pos_embed and patch_embed are layer 0, blocks.i is layer i + 1, everything else
    (norms, head) is the last layer, num_layers = depth + 1; scale = layer_decay ** (num_layers -
    layer). No weight decay on 1-D parameters and the names in no_weight_decay_list. timm's
    implementation gives exactly these groups (tested against the rule).
    """
    return param_groups_layer_decay(model, weight_decay=weight_decay,
                                    no_weight_decay_list=tuple(no_weight_decay_list), layer_decay=layer_decay)


class LARS(torch.optim.Optimizer):
    """LARS as in the official MAE linear probing (util/lars.py, from MoCo v3).

    timm's Lars is not equivalent: it also adapts 1-D parameters (the head's bias) and puts
    weight decay in the trust-ratio denominator differently, so the official update is kept.
    Matrices get the trust ratio trust_coefficient * |w| / |g + wd * w|; biases plain momentum SGD.
    """

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0., torch.where(update_norm > 0, (g["trust_coefficient"]
                                                                                   * param_norm / update_norm), one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss
