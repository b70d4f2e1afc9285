"""Balanced multi-source training: every source an equal share of each epoch.

Public nucleus sets differ in size by an order of magnitude (DSB2018 has ~15x the images of
MNFinder). Trained on their union, a model learns the big sources' look and over-counts on the
small ones, which are exactly the "other labs". :class:`BalancedSampler` draws the same number
of training tiles from every source each epoch (without replacement inside a source while it
has enough, a fresh draw every epoch), and :func:`balanced_trainer` gives an ultralytics
``DetectionTrainer`` that uses it, plus
:class:`~napari_yolocell.training.augment.MicroscopyAugment`.

A tile's source is the prefix of its file name before the first ``_`` (the dataset builder of
``scripts/train_bundled_models.py`` names tiles ``<source>_<image>_y.._x...png``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BalancedSampler",
    "DEFAULT_PER_SOURCE",
    "SmallObjectTargets",
    "balanced_trainer",
    "shares_of",
    "source_of",
]

#: Tiles per source per epoch when a share mapping does not say (``"*"``).
DEFAULT_PER_SOURCE = 60


def source_of(path: str | Path) -> str:
    """Source name of a training tile: its file name up to the first ``_``."""
    return Path(path).name.split("_", 1)[0]


class BalancedSampler:
    """Indices of ``per_source`` tiles from every source, shuffled; new draw on every pass.

    Parameters
    ----------
    sources : sequence of str
        Source of each dataset item (index order).
    per_source : int or mapping
        Tiles drawn from each source per epoch; a mapping ``{source: n}`` gives some sources
        another share (sources it does not name keep ``per_source["*"]``, default
        :data:`DEFAULT_PER_SOURCE`).
    seed : int
        Seed; pass ``k`` draws the same tiles for the same seed.
    """

    def __init__(self, sources: Sequence[str], per_source: int | Mapping[str, int], seed: int = 0):
        self.groups: dict[str, np.ndarray] = {}
        for i, s in enumerate(sources):
            self.groups.setdefault(s, []).append(i)  # type: ignore[union-attr]
        self.groups = {k: np.asarray(v) for k, v in sorted(self.groups.items())}
        if not self.groups:
            raise ValueError("no training items")
        self.shares = shares_of(per_source, self.groups)
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return sum(self.shares.values())

    def draw(self, epoch: int) -> np.ndarray:
        """The shuffled indices of pass ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch])
        picks = []
        for source, idx in self.groups.items():
            whole, rest = divmod(self.shares[source], len(idx))
            # every tile once per `whole` repeat, then a random subset for the remainder
            parts = [rng.permutation(idx) for _ in range(whole)]
            parts.append(rng.choice(idx, size=rest, replace=False))
            picks.append(np.concatenate(parts))
        out = np.concatenate(picks)
        rng.shuffle(out)
        return out

    def __iter__(self) -> Iterator[int]:
        order = self.draw(self.epoch)
        self.epoch += 1
        return iter(int(i) for i in order)

    def counts(self) -> dict[str, int]:
        """Tiles available per source."""
        return {k: len(v) for k, v in self.groups.items()}


def shares_of(per_source: int | Mapping[str, int], sources) -> dict[str, int]:
    """Tiles per epoch of each source from an int or a ``{source: n, "*": n}`` mapping."""
    if isinstance(per_source, Mapping):
        default = int(per_source.get("*", DEFAULT_PER_SOURCE))
        shares = {s: int(per_source.get(s, default)) for s in sources}
    else:
        shares = {s: int(per_source) for s in sources}
    bad = {s: n for s, n in shares.items() if n < 1}
    if bad:
        raise ValueError(f"per_source must be >= 1, got {bad}")
    return shares


def balanced_trainer(
    per_source: int | Mapping[str, int],
    augment: dict[str, float] | None = None,
    seed: int = 0,
    exclude: Sequence[str] = (),
    small_boost: tuple[float, float] | None = None,
):
    """An ultralytics ``DetectionTrainer`` subclass with balanced sampling and microscopy augment.

    Parameters
    ----------
    per_source : int or mapping
        Training tiles per source per epoch (a mapping: see :class:`BalancedSampler`).
    augment : dict, optional
        Probabilities for :class:`~napari_yolocell.training.augment.MicroscopyAugment`
        (None: its defaults; ``{}`` with every value 0 turns it off).
    seed : int
        Sampling seed.
    exclude : sequence of str
        Sources never drawn (leave-one-source-out); their tiles may stay in the file list.
    small_boost : (float, float), optional
        ``(size, power)``: raise the classification target of boxes under ``size`` px (the
        geometric mean of width and height, in the training tile) to ``target ** power``; see
        :class:`SmallObjectTargets`. None trains with ultralytics' targets.

    Returns
    -------
    type
        Pass as ``YOLO.train(trainer=...)``.
    """
    from napari_yolocell.models.ultralytics_env import import_ultralytics

    import_ultralytics()
    from ultralytics.data.build import InfiniteDataLoader, seed_worker
    from ultralytics.models.yolo.detect import DetectionTrainer

    from napari_yolocell.training.augment import MicroscopyAugment, insert_into

    excluded = set(exclude)

    class BalancedTrainer(DetectionTrainer):
        """DetectionTrainer drawing ``per_source`` tiles of every source each epoch."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if small_boost is not None:
                self.add_callback("on_train_start", _boost_small(*small_boost))

        def build_dataset(self, img_path, mode="train", batch=None):
            dataset = super().build_dataset(img_path, mode, batch)
            if mode == "train":
                insert_into(dataset, MicroscopyAugment(augment, seed=seed))
            return dataset

        def get_dataloader(self, dataset_path, batch_size=16, rank=0, mode="train"):
            if mode != "train":
                return super().get_dataloader(dataset_path, batch_size, rank, mode)
            dataset = self.build_dataset(dataset_path, mode, batch_size)
            sources = [source_of(f) for f in dataset.im_files]
            keep = [i for i, s in enumerate(sources) if s not in excluded]
            names = [sources[i] if sources[i] not in excluded else "" for i in range(len(sources))]
            sampler = _Subset(BalancedSampler([names[i] for i in keep], per_source, seed), keep)
            workers = min(self.args.workers, 2)
            return InfiniteDataLoader(
                dataset=dataset,
                batch_size=batch_size,
                shuffle=False,
                num_workers=workers,
                sampler=sampler,
                prefetch_factor=4 if workers else None,
                pin_memory=False,
                collate_fn=getattr(dataset, "collate_fn", None),
                worker_init_fn=seed_worker,
            )

    return BalancedTrainer


class SmallObjectTargets:
    """Wrap ultralytics' task-aligned assigner to raise the targets of small boxes.

    The assigner's classification target of a box is the IoU its best prediction reaches. Small
    nuclei never reach a high IoU (a pixel of box error is a large fraction of their size), so
    the model learns to give them low confidence and they fall under the detection threshold,
    although the labels call them nuclei. Raising their targets to ``target ** power`` (power
    < 1) teaches confidence without changing which anchors are positive. Unlabelled small
    objects (micronuclei, debris) stay negatives.

    Parameters
    ----------
    assigner : callable
        ``TaskAlignedAssigner`` instance.
    size : float
        Boxes whose sqrt(width * height) is under ``size`` px count as small.
    power : float
        Exponent applied to their targets, in (0, 1].
    """

    def __init__(self, assigner, size: float, power: float):
        if not 0.0 < power <= 1.0 or size <= 0:
            raise ValueError(f"small_boost needs size > 0 and 0 < power <= 1, got {size}, {power}")
        self.assigner = assigner
        self.size = float(size)
        self.power = float(power)

    def __getattr__(self, name: str) -> Any:
        if name == "assigner":  # not set yet (copy, unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.assigner, name)

    def __call__(self, *args, **kwargs):
        import torch

        labels, bboxes, scores, fg_mask, gt_idx = self.assigner(*args, **kwargs)
        wh = (bboxes[..., 2:] - bboxes[..., :2]).clamp(min=0)
        small = fg_mask.bool() & (wh.prod(-1).sqrt() < self.size)
        scores = torch.where(small[..., None], scores.clamp(min=0).pow(self.power), scores)
        return labels, bboxes, scores, fg_mask, gt_idx


def _boost_small(size: float, power: float):
    """An ``on_train_start`` callback giving the trained model's loss :class:`SmallObjectTargets`.

    It runs after the EMA copy is made, so only the model being optimised gets the wrapped
    assigner; the EMA (what is saved and validated) keeps ultralytics' loss and pickles as usual.
    """

    def callback(trainer) -> None:
        model = trainer.model
        model.criterion = model.init_criterion()
        model.criterion.assigner = SmallObjectTargets(model.criterion.assigner, size, power)

    return callback


class _Subset:
    """A sampler over a subset of a dataset's indices (the non-excluded sources)."""

    def __init__(self, sampler: BalancedSampler, keep: Sequence[int]):
        self.sampler = sampler
        self.keep = np.asarray(keep)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[int]:
        return iter(int(self.keep[i]) for i in self.sampler)

    def counts(self) -> dict[str, Any]:
        return self.sampler.counts()
