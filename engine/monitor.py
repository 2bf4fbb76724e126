"""The representation monitor (--monitor_every): is pretraining learning features that separate classes?

Every N epochs (and after the last) the encoder embeds a fixed, class-balanced subset of a labelled
dataset's train split (the memory bank, --monitor_train_size) and of its val split
(--monitor_val_size), nothing masked, on the evaluation transform. One forward pass per image gives
two features, the class token and the mean of the patch tokens, and from the cached features:

  knn_<feature>     weighted k-NN top-1 on val (k=20, cosine similarity, weights exp(sim / 0.07)),
                    as DINO and InstDisc report it;
  linear_<feature>  top-1 on val of a softmax regression fitted on the standardised bank features:
                    L-BFGS from zero weights, at most LINEAR_MAX_ITER iterations, weight decay
                    LINEAR_WEIGHT_DECAY: deterministic, bounded, and the optimum sklearn's
                    LogisticRegression(C=1 / (weight_decay * n)) finds.

The monitor must not change training: it draws from no RNG (the subsets come from a private numpy
generator keyed by the seed, the encoder's forward draws nothing, its loader has a private
generator), runs under no_grad, puts the model back in the mode it found it in, and adds no
collective to the training steps. Under DDP and FSDP each rank embeds every world_size-th image
(padded so that every rank runs the same number of forward passes: FSDP needs every rank in each)
and the features are gathered.
"""
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from util import dist as dist_util
from util.errors import UserError
from util.rng import get_rng_state, set_rng_state

from .data import KeyedSamples, eval_transform, open_source, to_model_input
from .profiling import named_range

log = logging.getLogger("mae")

KNN_K = 20
KNN_TEMPERATURE = 0.07
LINEAR_WEIGHT_DECAY = 1e-3
LINEAR_MAX_ITER = 100
_TRAIN_SALT, _VAL_SALT = 1, 2  # the bank and the val subset are drawn from distinct streams of the seed


# --------------------------------------------------------------------------- data
def check_monitor_args(args) -> None:
    """Flag values alone (no file access)."""
    if args.monitor_every < 0:
        raise UserError(f"--monitor_every must be 0 (off) or a number of epochs, got {args.monitor_every}")
    for name in ("monitor_train_size", "monitor_val_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.monitor_data_path and not args.monitor_every:
        raise UserError("--monitor_data_path without --monitor_every: the monitor is off; add --monitor_every N "
                        "or drop the flag")


def monitor_sources(args) -> Optional[SimpleNamespace]:
    """The monitor's labelled train and val splits and their fixed subsets (None when off), checked:
    labels, a val split, enough images for k-NN. Any format --data_path takes."""
    check_monitor_args(args)
    if not args.monitor_every:
        return None
    given = bool(args.monitor_data_path)
    path = args.monitor_data_path or args.data_path
    flag = "--monitor_data_path" if given else "--data_path"
    fmt = (args.data_format or "auto") if path == args.data_path else "auto"
    columns = dict(image_column=args.image_column, label_column=args.label_column) if path == args.data_path else {}
    splits = {}
    for split in ("train", "val"):
        try:
            splits[split] = open_source(path, split, data_format=fmt, need_labels=True, allow_empty_classes=False,
                                        **columns)
        except UserError as e:
            hint = "" if given else " (the default, --data_path); give --monitor_data_path with train and val splits"
            raise UserError(f"--monitor_every needs labelled images with a train and a val split: {flag} {path}"
                            f"{hint}: {e}") from None
    train, val = splits["train"], splits["val"]
    bank = balanced_subset(train, min(args.monitor_train_size, len(train)), args.seed, _TRAIN_SALT)
    if len(bank[0]) < KNN_K:
        raise UserError(f"--monitor_every: the memory bank has {len(bank[0])} images ({flag} {path} train: "
                        f"{len(train)}, --monitor_train_size {args.monitor_train_size}), fewer than k={KNN_K} "
                        "neighbours: use more images")
    if len(np.unique(bank[1])) < 2:
        raise UserError(f"--monitor_every needs labelled images: the train split of {flag} {path} has one class, "
                        "so there is nothing to classify; give --monitor_data_path with two classes or more")
    subset = balanced_subset(val, min(args.monitor_val_size, len(val)), args.seed, _VAL_SALT)
    return SimpleNamespace(train=train, val=val, path=path, bank=bank, val_subset=subset)


def listed_labels(source) -> Optional[np.ndarray]:
    """Every label of `source` when it lists them without reading an image (`targets`: an image
    folder's, a Hugging Face dataset's label column); None for sources whose labels sit beside each
    image (tar shards' .cls members)."""
    targets = getattr(source, "targets", None)
    return None if targets is None else np.asarray(targets, dtype=np.int64)


def _read_labels(source, candidates: np.ndarray) -> np.ndarray:
    """The labels of `candidates`, read in source order: tar shards are read front to back, each
    opened once, not once per image as a random order would (the LRU holds a few shards)."""
    labels = np.empty(len(candidates), dtype=np.int64)
    for j in np.argsort(candidates, kind="stable"):
        labels[j] = source[int(candidates[j])][1]
    return labels


def balanced_subset(source, size: int, seed: int, salt: int) -> Tuple[np.ndarray, np.ndarray]:
    """(indices, labels) of `size` images of `source`, as many of each class as there are (round
    robin over the classes in a seeded random order), the same for every process and world size,
    sorted by index (the monitor reads them in source order). Sources that do not list their labels
    (listed_labels) are read for at most 4 * size candidates."""
    rng = np.random.default_rng([seed, salt])  # private: no global stream is touched
    order = rng.permutation(len(source))
    listed = listed_labels(source)
    if listed is None:
        order = order[:4 * size]
        labels = _read_labels(source, order)
    else:
        labels = listed[order]
    # Rank of each candidate within its class, in the permutation's order: take rank 0 of every
    # class, then rank 1, ...
    by_class = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[by_class], labels[by_class])
    rank_in_class = np.empty(len(order), dtype=np.int64)
    rank_in_class[by_class] = np.arange(len(order)) - starts
    chosen = np.lexsort((np.arange(len(order)), rank_in_class))[:size]
    chosen = chosen[np.argsort(order[chosen], kind="stable")]  # by source index, the labels along
    return order[chosen], labels[chosen]


# --------------------------------------------------------------------------- features
def _shard(n: int, world: int, rank: int) -> np.ndarray:
    """Positions 0..n-1 that `rank` embeds, padded with -1 to ceil(n / world) so that every rank runs
    the same batches (FSDP: each forward needs all ranks)."""
    mine = np.arange(rank, n, world)
    out = np.full(math.ceil(n / world), -1, dtype=np.int64)
    out[:len(mine)] = mine
    return out


@torch.no_grad()
def embed(forward: Callable, source, indices: np.ndarray, input_size: int, batch_size: int, device: torch.device,
          amp_dtype=None, num_workers: int = 0, seed: int = 0) -> Dict[str, torch.Tensor]:
    """{feature: (len(indices), D) float32} of the images source[indices], gathered on every rank.
    forward: images -> {feature: (N, D)} (the model's encoder_features)."""
    world, rank = dist_util.get_world_size(), dist_util.get_rank()
    positions = _shard(len(indices), world, rank)
    keys = [(0, int(indices[max(p, 0)])) for p in positions]  # a pad re-embeds the first image
    dataset = KeyedSamples(source, eval_transform(input_size), seed, torch_rng_only=True)
    # A private generator: DataLoader draws its base seed from the global RNG otherwise.
    loader = DataLoader(dataset, sampler=keys, batch_size=batch_size, num_workers=num_workers, drop_last=False,
                        generator=torch.Generator().manual_seed(seed))
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    parts: Dict[str, List[torch.Tensor]] = {}
    for images, _ in loader:
        with autocast:
            out = forward(to_model_input(images, device))
        for name, value in out.items():
            parts.setdefault(name, []).append(value.float())
    local = {name: torch.cat(values) for name, values in parts.items()}
    if world == 1:
        return local
    pos = torch.as_tensor(positions, device=device)
    gathered_pos = [torch.empty_like(pos) for _ in range(world)]
    torch.distributed.all_gather(gathered_pos, pos)
    gathered_pos = torch.cat(gathered_pos)
    keep = gathered_pos >= 0
    order = torch.argsort(gathered_pos[keep])
    features = {}
    for name, value in sorted(local.items()):
        chunks = [torch.empty_like(value) for _ in range(world)]
        torch.distributed.all_gather(chunks, value.contiguous())
        features[name] = torch.cat(chunks)[keep][order]
    return features


# --------------------------------------------------------------------------- the numbers
def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor,
             num_classes: int, k: int = KNN_K, temperature: float = KNN_TEMPERATURE, chunk: int = 1024) -> float:
    """Top-1 (%) of the weighted k-NN vote: the k most cosine-similar bank features each vote for
    their label with weight exp(similarity / temperature); ties go to the lower class."""
    bank, query = F.normalize(bank.float(), dim=1), F.normalize(query.float(), dim=1)
    correct = 0
    for s in range(0, len(query), chunk):
        sim, idx = (query[s:s + chunk] @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        correct += int((votes.argmax(dim=1) == query_labels[s:s + chunk]).sum())
    return 100.0 * correct / len(query)


def linear_top1(train: torch.Tensor, train_labels: torch.Tensor, val: torch.Tensor, val_labels: torch.Tensor,
                num_classes: int, weight_decay: float = LINEAR_WEIGHT_DECAY, max_iter: int = LINEAR_MAX_ITER) -> float:
    """Top-1 (%) on val of softmax regression on standardised features (the bank's mean and
    population std): mean cross-entropy + weight_decay / 2 * |W|^2 (bias free), L-BFGS from zeros."""
    mean, std = train.mean(dim=0), train.std(dim=0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    x, xv = (train - mean) / std, (val - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, train_labels) + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        correct = int(((xv @ weight + bias).argmax(dim=1) == val_labels).sum())
    return 100.0 * correct / len(val_labels)


def scores(bank: Dict[str, torch.Tensor], bank_labels: torch.Tensor, val: Dict[str, torch.Tensor],
           val_labels: torch.Tensor) -> Dict[str, float]:
    """knn_<feature> and linear_<feature> for every feature."""
    num_classes = int(max(bank_labels.max(), val_labels.max())) + 1
    out = {}
    for name in sorted(bank):
        out[f"knn_{name}"] = knn_top1(bank[name], bank_labels, val[name], val_labels, num_classes)
        out[f"linear_{name}"] = linear_top1(bank[name], bank_labels, val[name], val_labels, num_classes)
    return out


# --------------------------------------------------------------------------- the hook
@dataclass
class Monitor:
    """One monitor: its fixed subsets and how to embed them. measure() runs on every rank (the
    encoder's forward may need all of them); the numbers are returned on rank 0, {} elsewhere."""
    sources: SimpleNamespace
    bank: Tuple[np.ndarray, np.ndarray]
    val: Tuple[np.ndarray, np.ndarray]
    input_size: int
    batch_size: int
    device: torch.device
    amp_dtype: Optional[torch.dtype] = None
    num_workers: int = 0
    seed: int = 0

    @classmethod
    def build(cls, sources: SimpleNamespace, **kwargs) -> "Monitor":
        """sources: monitor_sources()'s answer."""
        return cls(sources, sources.bank, sources.val_subset, **kwargs)

    @property
    def images(self) -> int:
        return len(self.bank[0]) + len(self.val[0])

    def measure(self, model: torch.nn.Module) -> Dict[str, float]:
        """The numbers for `model` (the plain or FSDP module) and the seconds they took; in a
        --profile trace they are the range "monitor"."""
        start = time.perf_counter()
        was_training = [m.training for m in model.modules()]
        rng = get_rng_state()  # no draw is expected; this makes sure
        model.eval()
        try:
            with named_range("monitor"):
                common = dict(input_size=self.input_size, batch_size=self.batch_size, device=self.device,
                              amp_dtype=self.amp_dtype, num_workers=self.num_workers, seed=self.seed)
                bank = embed(model.encoder_features, self.sources.train, self.bank[0], **common)
                val = embed(model.encoder_features, self.sources.val, self.val[0], **common)
                out = {}
                if dist_util.is_main_process():
                    labels = (torch.as_tensor(self.bank[1], device=self.device),
                              torch.as_tensor(self.val[1], device=self.device))
                    out = scores(bank, labels[0], val, labels[1])
        finally:
            for m, mode in zip(model.modules(), was_training):
                m.training = mode
            set_rng_state(rng)
        if out:
            out["seconds"] = time.perf_counter() - start
        return out


def format_line(numbers: Dict[str, float]) -> str:
    return "  ".join(f"{k}: {v:.2f}" + ("s" if k == "seconds" else "%") for k, v in numbers.items())


INITIAL_KEY = "monitor_initial"  # checkpoint entry: initial-weights numbers not yet reported


def monitor_hook(monitor: Monitor, model: torch.nn.Module, every: int, epochs: int, log_writer=None,
                 initial: bool = True, pending: Optional[Dict[str, float]] = None,
                 checkpoint_state: Optional[dict] = None) -> Callable[[int], Tuple[dict, bool, Optional[dict]]]:
    """fit()'s after_epoch for the monitor: numbers every `every` epochs and after the last, as one
    log line, log.txt fields 'monitor/<name>', tensorboard / W&B scalars at the epoch. initial: a new
    run measures the initial weights now (before any training) and reports them with the first
    numbers, once. Until then they ride in checkpoint_state (the checkpoints' extra entries): a run
    killed before its first report gets them back as `pending` when it resumes."""
    first: Dict[str, float] = dict(pending or {})
    if initial:
        first = monitor.measure(model)
    state = checkpoint_state if checkpoint_state is not None else {}
    if first:
        state[INITIAL_KEY] = dict(first)

    def after_epoch(epoch: int):
        if epoch % every and epoch + 1 != epochs:
            return {}, False, None
        numbers = monitor.measure(model)
        if not numbers:
            return {}, False, None
        fields = {f"monitor/{k}": v for k, v in numbers.items()}
        log.info("Monitor [%d] (%d images): %s", epoch, monitor.images, format_line(numbers))
        if first:
            log.info("Monitor at the initial weights: %s", format_line(first))
            fields.update({f"monitor/initial/{k}": v for k, v in first.items()})
        if log_writer is not None:
            for tag, value in fields.items():
                log_writer.add_scalar(tag, value, epoch)
        first.clear()
        state.pop(INITIAL_KEY, None)  # reported: the checkpoint of this epoch no longer carries them
        return fields, False, None
    return after_epoch


def chain(hooks: Sequence[Optional[Callable]]) -> Optional[Callable]:
    """Several after_epoch hooks as one: fields merged, best if any says so, extra states merged."""
    hooks = [h for h in hooks if h is not None]
    if len(hooks) < 2:
        return hooks[0] if hooks else None

    def after_epoch(epoch: int):
        fields, best, extra = {}, False, None
        for hook in hooks:
            f, b, e = hook(epoch)
            fields.update(f)
            best = best or b
            if e:
                extra = {**(extra or {}), **e}
        return fields, best, extra
    return after_epoch
