"""Every implementation of a part the trainer takes satisfies its protocol (engine/protocols.py),
and an object missing one of the calls does not."""
import torch

from engine.checkpoint import make_checkpointer
from engine.data import LoaderSettings, image_folder, pretrain_transform, train_loader
from engine.distributed import DDPStrategy, FSDPStrategy
from engine.protocols import Checkpointer, LogWriter, Strategy, TrainLoader
from engine.reporting.logs import LogWriters


def test_strategies():
    assert isinstance(DDPStrategy(), Strategy) and isinstance(FSDPStrategy(), Strategy)

    class NoWrap:
        name, sharded, device = "x", False, None

        def build(self, make): ...
    assert not isinstance(NoWrap(), Strategy)


def test_checkpointers_of_both_backends(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    single = make_checkpointer(DDPStrategy(), str(tmp_path), model, optimizer, scaler, {"model": "m"})
    assert isinstance(single, Checkpointer) and single.last_name == "checkpoint-last.pth"
    single.close()  # a no-op for files, so the trainer calls it unconditionally
    sharded = FSDPStrategy()
    assert sharded.sharded  # its checkpointer is the DCP backend's (built in tests/test_fsdp.py under torchrun)


def test_training_loader(photos):
    loader = train_loader(image_folder(str(photos), "train"), pretrain_transform(32, "uint8"), "uint8",
                          LoaderSettings(batch_size=2, seed=0), noise_len=4, torch_rng_only=True)
    assert isinstance(loader, TrainLoader) and loader.iters_per_epoch == 7 and loader.global_batch == 2


def test_log_writers(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    writers = LogWriters(SummaryWriter(log_dir=str(tmp_path)))
    assert isinstance(writers, LogWriter) and writers.checkpoint_state() == {}
    writers.add_scalar("x", 1.0, 0)
    writers.end_row()  # tensorboard has no rows: nothing to send, and no probing for it
    writers.close()
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())
    assert not isinstance(SummaryWriter(log_dir=str(tmp_path / "b")), LogWriter)  # no end_row: wrapped
