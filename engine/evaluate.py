"""Classification evaluation: loss, top-1 and top-5 accuracy over every sample exactly once."""
import logging
from contextlib import nullcontext

import torch

from util import dist as dist_util
from util.meters import LoopTimer

log = logging.getLogger("mae")


@torch.no_grad()
def evaluate(model, loader, device: torch.device, amp_dtype=None, sharded: bool = False,
             print_freq: int = 50) -> dict:
    """`model` is the plain module (not DDP: shards may differ in length, so no collectives run
    inside the loop). With sharded=True the per-rank sums are added across ranks."""
    model.eval()
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    # loss sum, top-1 hits, top-5 hits, samples
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    timer = LoopTimer(len(loader))
    for i, (images, target) in enumerate(loader):
        timer.data_ready()
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with autocast:
            output = model(images)
        output = output.float()
        loss = torch.nn.functional.cross_entropy(output, target, reduction="sum")
        k = min(5, output.shape[1])
        hits = output.topk(k, dim=1).indices.eq(target[:, None])
        totals += torch.stack([loss.double(), hits[:, 0].sum().double(), hits.sum().double(),
                               torch.tensor(float(len(target)), dtype=torch.float64, device=device)])
        timer.step_done()
        if (i + 1) % print_freq == 0:
            log.info("Test:  [%d/%d]  eta: %s", i + 1, len(loader), timer.eta())
    if sharded and dist_util.is_dist():
        torch.distributed.all_reduce(totals)
    loss_sum, top1, top5, n = totals.tolist()
    n = max(n, 1.0)
    stats = {"loss": loss_sum / n, "acc1": 100.0 * top1 / n, "acc5": 100.0 * top5 / n, "samples": int(n)}
    log.info("* Acc@1 %.3f Acc@5 %.3f loss %.3f", stats["acc1"], stats["acc5"], stats["loss"])
    log.info("Accuracy of the network on the %d test images: %.1f%%", stats["samples"], stats["acc1"])
    return stats
