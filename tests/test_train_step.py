"""The training step and the epoch loop in-process, on tiny models: accumulation, clipping, the
non-finite policy, the per-iteration schedule, no-sync micro-steps, checkpoint positions and the
distribution seam. tests/test_pretrain_engine.py and tests/test_resume.py run the same as CLIs."""
import logging
from argparse import Namespace
from contextlib import contextmanager

import pytest
import torch

from engine.checkpoint import FILE_LAST as LAST
from engine.checkpoint import make_checkpointer
from engine.distributed import DDPStrategy, unwrap
from engine.lr_sched import LrSchedule, lr_at
from engine.trainer import NonFiniteWatch, TrainingRun, train_one_epoch, train_step
from util.errors import TrainingStopped

CPU = torch.device("cpu")


def mse(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)


def make_run(model=None, lr=0.1, **fields) -> TrainingRun:
    """SGD without momentum: an update is -lr * gradient, so a wrong gradient scale shows (AdamW would hide it)."""
    if model is None:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return TrainingRun(model=model, compute_loss=fields.pop("compute_loss", mse), optimizer=optimizer,
                       scaler=torch.amp.GradScaler("cpu", enabled=False), device=CPU, **fields)


def weights(run):
    return [p.detach().clone() for p in run.params]


class ListLoader:
    """The TrainLoader interface over a list of batches (one epoch; global batch = batch size)."""

    def __init__(self, batches):
        self.batches, self.global_batch = batches, len(batches[0][0])
        self.iters_per_epoch = len(batches)
        self.positions, self._start = [], 0

    def set_position(self, epoch, samples_done=0):
        self.positions.append((epoch, samples_done))
        self._start = samples_done // self.global_batch

    def __iter__(self):
        return iter(self.batches[self._start:])


class SaveLog:
    """A checkpointer that records what it was asked to save."""
    last_name = "checkpoint-last.pth"

    def __init__(self):
        self.saves, self.closed, self.extra_state = [], 0, {}

    def save(self, epoch, epoch_iter, epoch_iters, samples_in_epoch, **kw):
        self.saves.append((epoch, epoch_iter, epoch_iters, samples_in_epoch))

    def close(self):
        self.closed += 1


def loop_run(batches, **fields) -> TrainingRun:
    return make_run(loader=ListLoader(batches), checkpointer=SaveLog(),
                    schedule=fields.pop("schedule", LrSchedule(lr=0.1, min_lr=0.1, warmup_epochs=0, epochs=10)),
                    epochs=10, print_freq=fields.pop("print_freq", 100), **fields)


def test_accumulation_equals_one_big_batch():
    x, y = data(8)
    big = make_run()
    loss, norm_big = train_step(big, (x, y), 0, NonFiniteWatch(CPU, 0))
    assert norm_big is not None

    small = make_run(accum_iter=2)
    before = weights(small)
    watch = NonFiniteWatch(CPU, 0)
    _, norm = train_step(small, (x[:4], y[:4]), 0, watch)
    assert norm is None and all(torch.equal(a, b) for a, b in zip(before, weights(small)))  # a micro-step only
    _, norm_small = train_step(small, (x[4:], y[4:]), 1, watch)
    assert norm_small == pytest.approx(norm_big.item(), rel=1e-5)
    for a, b in zip(weights(big), weights(small)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in small.params)  # the next window starts from zero


def test_clipping_bounds_the_update_and_reports_the_unclipped_norm():
    x, y = data(8)
    run = make_run(lr=1.0, clip_grad=0.01)
    probe = make_run()  # same initial weights: the unclipped gradient
    mse(probe.model, (x, y)).backward()
    unclipped = torch.cat([p.grad.flatten() for p in probe.params]).norm()
    assert unclipped > 0.01
    before = weights(run)
    _, norm = train_step(run, (x, y), 0, NonFiniteWatch(CPU, 0))
    assert norm.item() == pytest.approx(unclipped.item(), rel=1e-5)
    update = torch.cat([(a - b).flatten() for a, b in zip(before, weights(run))])
    assert update.norm().item() == pytest.approx(0.01, rel=1e-4)


def scaled_loss(factors):
    """mse times factors[i] on the i-th call (inf: a non-finite loss)."""
    calls = iter(factors)

    def compute(model, batch):
        return mse(model, batch) * next(calls)
    return compute


def test_skip_nonfinite_skips_only_the_bad_step(caplog):
    x, y = data(8)
    run = make_run(skip_nonfinite=True, compute_loss=scaled_loss([1.0, float("inf"), 1.0]))
    watch = NonFiniteWatch(CPU, epoch=3, skip=True)
    train_step(run, (x, y), 0, watch)
    after_first = weights(run)
    with caplog.at_level(logging.WARNING, logger="mae"):
        _, norm = train_step(run, (x, y), 1, watch)
    assert norm is None and watch.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(after_first, weights(run)))
    assert "non-finite loss at epoch 3, iteration 1: optimizer step skipped" in caplog.text
    # No gradient left over from the skipped step: the next update is exactly SGD's on this batch alone.
    expected_norm, expected = sgd_reference(after_first, x, y, lr=0.1)
    _, norm = train_step(run, (x, y), 2, watch)
    assert norm.item() == pytest.approx(expected_norm, rel=1e-6)
    for a, b in zip(weights(run), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    watch.check()  # never stops with skip


def sgd_reference(params, x, y, lr):
    """Gradient norm of mse for a Linear(4, 1) with these (weight, bias), and the weights after one
    plain SGD step, from the closed form: d/dW mean((xW^T + b - y)^2) = 2/n (xW^T + b - y)^T x."""
    w, b = (p.double() for p in params)
    r = x.double() @ w.T + b - y.double()
    gw, gb = 2 / len(x) * r.T @ x.double(), 2 / len(x) * r.sum(0)
    norm = torch.cat([gw.flatten(), gb]).norm().item()
    return norm, [(w - lr * gw).float(), (b - lr * gb).float()]


def test_nonfinite_loss_stops_before_any_checkpoint_of_it():
    x, y = data(8)
    batches = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]
    run = loop_run(batches, save_every_steps=1, compute_loss=scaled_loss([1.0, float("nan"), 1.0, 1.0]))
    with pytest.raises(TrainingStopped, match=r"^loss is not finite at epoch 0, iteration 1: training stopped"):
        train_one_epoch(run, 0)
    assert run.checkpointer.saves == [(0, 1, 4, 2)]  # after iteration 0 only


def test_schedule_is_set_per_iteration_at_each_window_start():
    x, y = data(8)
    batches = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]
    model = torch.nn.Linear(4, 1)
    seen = []

    def compute(m, batch):
        seen.append([g["lr"] for g in run.optimizer.param_groups])
        return mse(m, batch)

    schedule = LrSchedule(lr=1.0, min_lr=0.0, warmup_epochs=2, epochs=4)
    run = loop_run(batches, model=model, accum_iter=2, schedule=schedule, compute_loss=compute)
    run.optimizer = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr_scale": 0.5}], lr=9.)
    run.params = [model.weight, model.bias]
    stats = train_one_epoch(run, 1)
    first, second = lr_at(1 + 0 / 4, schedule), lr_at(1 + 2 / 4, schedule)  # windows start at iterations 0 and 2
    assert (first, second) == (0.5, 0.75)
    assert seen == [[first, first / 2]] * 2 + [[second, second / 2]] * 2
    assert stats["lr"] == pytest.approx((first + second) / 2)


class FakeDDP(torch.nn.Module):
    """What the strategy sees of DDP: a wrapper with no_sync(). Records, for each backward pass,
    whether gradients would have been all-reduced."""

    def __init__(self, module):
        super().__init__()
        self.module, self.syncing, self.backward_synced = module, True, []
        module.weight.register_hook(self._record)

    def _record(self, grad):
        self.backward_synced.append(self.syncing)

    @contextmanager
    def no_sync(self):
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    def forward(self, x):
        return self.module(x)


def test_gradients_are_synchronised_only_on_the_last_micro_step():
    torch.manual_seed(0)
    model = FakeDDP(torch.nn.Linear(4, 1))
    run = make_run(model=model, accum_iter=3)
    x, y = data(12)
    watch = NonFiniteWatch(CPU, 0)
    for it in range(6):
        train_step(run, (x[2 * it:2 * it + 2], y[2 * it:2 * it + 2]), it, watch)
    assert model.backward_synced == [False, False, True, False, False, True]


class AgreedStop:
    """A StopRequest whose signal every rank has agreed on from the first step boundary on."""

    def __init__(self):
        self.stopped = None

    def agreed(self):
        return True

    def stop(self, where, saved):
        self.stopped, self.saved = where, saved
        raise TrainingStopped(where)


def test_mid_epoch_resume_positions_and_the_agreed_stop():
    x, y = data(10)
    batches = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 10, 2)]  # 5 iterations of global batch 2
    run = loop_run(batches, save_every_steps=2)
    seen = []
    run.compute_loss = lambda m, b: (seen.append(b), mse(m, b))[1]
    # Resumed after 5 samples, written by a run of another global batch: iterations 2, 3 and 4 are left.
    train_one_epoch(run, 7, start_sample=5)
    assert run.loader.positions == [(7, 5)] and len(seen) == 3 and torch.equal(seen[0][0], x[4:6])
    # Saved after iteration 4 with the samples done (5 + 2 x 2); the end of the epoch (5) is fit()'s to save.
    assert run.checkpointer.saves == [(7, 4, 5, 9)]

    run = loop_run(batches, stop=AgreedStop())
    with pytest.raises(TrainingStopped):
        train_one_epoch(run, 2, start_sample=2)
    assert run.checkpointer.saves == [(2, 2, 5, 4)] and run.stop.stopped == "at epoch 2, iteration 2"
    assert run.stop.saved == "checkpoint-last.pth"  # the stop message names what the checkpointer wrote


def test_run_takes_the_config_once():
    cfg = Namespace(optim=Namespace(accum_iter=4, clip_grad=1.5, skip_nonfinite=True, lr=0.25, min_lr=0.01,
                                    warmup_epochs=3, epochs=9),
                    logging=Namespace(print_freq=7),
                    checkpoint=Namespace(save_every=5, save_every_steps=8, output_dir="out"))
    run = TrainingRun.from_config(cfg, **{k: v for k, v in vars(make_run()).items()
                                          if k in ("model", "compute_loss", "optimizer", "scaler", "device")})
    assert (run.accum_iter, run.clip_grad, run.skip_nonfinite, run.epochs, run.print_freq, run.save_every,
            run.save_every_steps, run.output_dir) == (4, 1.5, True, 9, 7, 5, 8, "out")
    assert run.schedule == LrSchedule(lr=0.25, min_lr=0.01, warmup_epochs=3, epochs=9)


def test_checkpoint_holds_the_plain_module_state_whatever_the_wrapper(tmp_path):
    """The seam unwraps torch.compile and DDP: a checkpoint's keys are the model's own, as the
    official checkpoints' and as resume and --finetune expect."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    compiled = torch.compile(model)  # lazy: nothing is compiled unless it is called
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(compiled)
        assert unwrap(ddp) is model and DDPStrategy.module(ddp) is model
        for name, wrapped in (("compiled", compiled), ("ddp", ddp)):
            out = tmp_path / name
            make_checkpointer(DDPStrategy(), str(out), wrapped, optimizer, scaler, {"model": "seq"}).save(0, 1, 1, 4)
            saved = torch.load(out / LAST, weights_only=True)["model"]
            assert list(saved) == list(model.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]
            assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    finally:
        torch.distributed.destroy_process_group()


def test_single_process_strategy_leaves_the_model_unwrapped():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    assert DDPStrategy(CPU).wrap(model) is model
    # A plain module has nothing to hold back: its no_sync micro-step still accumulates, so two
    # micro-batches of 4 update the weights as one batch of 8 does (closed-form reference).
    x, y = data(8)
    expected_norm, expected = sgd_reference([p.detach().clone() for p in model.parameters()], x, y, lr=0.1)
    run = make_run(model=model, accum_iter=2)
    watch = NonFiniteWatch(CPU, 0)
    train_step(run, (x[:4], y[:4]), 0, watch)
    _, norm = train_step(run, (x[4:], y[4:]), 1, watch)
    assert norm.item() == pytest.approx(expected_norm, rel=1e-6)
    for a, b in zip(weights(run), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
