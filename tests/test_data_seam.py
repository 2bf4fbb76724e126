"""The data seam (engine/data): any ImageSource feeds the same loaders as an image folder.

A source maps an index to (encoded bytes or a decoded image, label); everything after it (keyed
draws, decoding per pipeline, samplers, resume positions) is shared, so a source that holds the
same images yields the very batches the folder yields.
"""
import io

import pytest
import torch
from PIL import Image

from engine.data import (
    LoaderSettings,
    eval_loader,
    eval_transform,
    image_folder,
    pretrain_transform,
    to_model_input,
    train_loader,
)


class MemorySource:
    """The images of a folder held in memory, as bytes or (decoded=True) as PIL images."""

    def __init__(self, folder, decoded: bool = False, broken=()):
        self.root, self.classes = "memory", folder.classes
        self.items = []
        for path, target in folder.samples:
            with open(path, "rb") as f:
                data = f.read()
            self.items.append((Image.open(io.BytesIO(data)) if decoded else data, target))
        self.broken = set(broken)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        if index in self.broken:
            raise OSError("shard unavailable")
        return self.items[index]

    def name(self, index):
        return f"memory[{index}]"


def batches(loader, epoch, done):
    loader.set_position(epoch, done)
    return [(to_model_input(x, torch.device("cpu")), y, noise) for x, y, noise in loader]


@pytest.mark.parametrize("pipeline", ["pil", "uint8", "device_decode"])
def test_a_source_in_memory_gives_the_folders_batches(photos, pipeline):
    folder = image_folder(str(photos), "train")
    feed = LoaderSettings(batch_size=3, seed=5, world_size=2, rank=1)
    loaders = [train_loader(s, pretrain_transform(32, pipeline), pipeline, feed, noise_len=4, torch_rng_only=True)
               for s in (folder, MemorySource(folder))]
    assert loaders[0].iters_per_epoch == loaders[1].iters_per_epoch == 2 and loaders[1].global_batch == 6
    want, got = (batches(loader, epoch=1, done=6) for loader in loaders)
    assert len(want) == len(got) == 1  # 14 images, 7 per process, 6 of the epoch's 14 done: one batch left
    for (x0, y0, n0), (x1, y1, n1) in zip(want, got):
        assert x0.shape == (3, 3, 32, 32)
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and torch.equal(n0, n1)


def test_a_source_of_decoded_images_gives_the_official_loaders_samples(photos):
    folder = image_folder(str(photos), "train")
    feed = LoaderSettings(batch_size=7, seed=0)
    want, got = (batches(train_loader(s, pretrain_transform(32), "pil", feed, noise_len=4), epoch=0, done=0)
                 for s in (folder, MemorySource(folder, decoded=True)))
    assert len(want) == 2 and all(torch.equal(a, b) for w, g in zip(want, got) for a, b in zip(w, g))


def test_an_unreadable_sample_of_any_source_is_named_and_replaced(photos, capfd):
    folder = image_folder(str(photos), "train")
    feed = LoaderSettings(batch_size=14, seed=0)
    ok = MemorySource(folder)
    broken = MemorySource(folder, broken={4})
    (x0, y0), = [(x, y) for x, y in eval_loader(ok, eval_transform(32), feed, shard=False)]
    (x1, y1), = [(x, y) for x, y in eval_loader(broken, eval_transform(32), feed, shard=False)]
    assert torch.equal(x1[4], x0[5]) and torch.equal(x1[:4], x0[:4]) and torch.equal(x1[5:], x0[5:])
    err = capfd.readouterr().err
    assert "warning: unreadable image memory[4] (OSError: shard unavailable); using memory[5] in its place" in err


def test_eval_shards_cover_every_sample_once(photos):
    folder = image_folder(str(photos), "train")
    seen = []
    for rank in range(3):
        loader = eval_loader(folder, eval_transform(32), LoaderSettings(4, 0, world_size=3, rank=rank), shard=True)
        seen += [i for _, i in loader.sampler]
    assert sorted(seen) == list(range(14))
    whole = eval_loader(folder, eval_transform(32), LoaderSettings(4, 0, world_size=3, rank=2), shard=False)
    assert [i for _, i in whole.sampler] == list(range(14))
