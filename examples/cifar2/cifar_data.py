"""CIFAR-2 data: two CIFAR-10 classes from disk (torchvision), or synthetic look-alikes.

The real loader never downloads: fetch CIFAR-10 once yourself, e.g.
``python -c "import torchvision; torchvision.datasets.CIFAR10('data/cifar10', download=True)"``,
then pass ``--root data/cifar10``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from model import synthetic_cifar2
from torch import Tensor

#: CIFAR-10 class names, by label.
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


@dataclass
class Split:
    """Images [n, 3, 32, 32] (float32, normalised), labels in {0, 1}, dataset indices."""

    x: Tensor
    y: Tensor
    index: Tensor


def load_cifar2(
    root: str, classes: tuple[int, int], *, train: bool, limit: int | None = None
) -> Split:
    """The two CIFAR-10 classes `classes` (label 0 and 1) of one split, read from `root`."""
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(root, train=train, download=False)
    except RuntimeError as e:
        raise SystemExit(
            f"CIFAR-10 is not under {root!r} ({e}). Download it once with\n"
            f'  python -c "import torchvision; torchvision.datasets.CIFAR10({root!r}, download=True)"\n'
            "or run with --synthetic."
        ) from e
    targets = torch.as_tensor(ds.targets)
    keep = torch.nonzero((targets == classes[0]) | (targets == classes[1])).flatten()
    if limit is not None:
        keep = keep[:limit]
    images = torch.from_numpy(ds.data[keep.numpy()]).permute(0, 3, 1, 2).float() / 255.0
    return Split((images - _MEAN) / _STD, (targets[keep] == classes[1]).long(), keep)


def load(config: dict, *, train: bool) -> Split:
    """The split described by a train.py configuration (synthetic or real)."""
    if config["synthetic"]:
        n_train, n_test = config["n_train"], config["n_test"]
        x, y = synthetic_cifar2(n_train + n_test, seed=config["seed"])
        part = slice(0, n_train) if train else slice(n_train, n_train + n_test)
        index = torch.arange(n_train + n_test)[part]
        return Split(x[part], y[part], index)
    limit = config["n_train"] if train else config["n_test"]
    return load_cifar2(config["root"], tuple(config["classes"]), train=train, limit=limit)
