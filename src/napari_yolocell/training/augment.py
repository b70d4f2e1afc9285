"""Microscopy image augmentation for training: what other labs' images look like.

ultralytics' own augmentation is geometric (mosaic, scale, flips) plus colour jitter for natural
images. Nuclei from other labs differ in ways it never shows: defocus, camera noise (Poisson
shot noise plus Gaussian read noise), gamma and contrast of the display stretch, JPEG artefacts,
resolution loss, uneven illumination, saturated bright nuclei beside dim ones, and the few grey
levels of a dim image stretched to 8 bit. :class:`MicroscopyAugment` adds these, all
photometric (boxes unchanged), with albumentations for the standard ones.

It runs on the grey plane (the images are grey replicated to three channels, as detection feeds
them), so noise never makes the channels differ. :func:`insert_into` puts it into an ultralytics
dataset's transform chain, after mosaic and the affine jitter and before tensor formatting.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["MicroscopyAugment", "insert_into", "PHOTOMETRIC_DEFAULTS"]

# Probability of each effect per training sample (several can apply to one sample).
PHOTOMETRIC_DEFAULTS: dict[str, float] = {
    "blur": 0.2,  # defocus / Gaussian blur
    "noise": 0.3,  # Poisson-Gaussian camera noise
    "gamma": 0.3,  # gamma and contrast of the display stretch
    "jpeg": 0.15,  # 8-bit JPEG artefacts
    "downscale": 0.15,  # resolution loss (downscale then upscale)
    "illumination": 0.2,  # smooth uneven illumination
    "saturate": 0.15,  # bright nuclei clipped at 255 (dim ones kept)
    "quantise": 0.1,  # few grey levels: a dim image stretched to 8 bit
}


def _albumentations_pipeline(p: dict[str, float]):
    import albumentations as A

    return A.Compose(
        [
            A.OneOf(
                [
                    A.GaussianBlur(blur_limit=(3, 7), sigma_limit=(0.5, 2.0)),
                    A.Defocus(radius=(1, 3), alias_blur=(0.1, 0.3)),
                ],
                p=p["blur"],
            ),
            A.Illumination(
                mode="linear", intensity_range=(0.05, 0.2), effect_type="both", p=p["illumination"]
            ),
            A.RandomGamma(gamma_limit=(60, 170), p=p["gamma"]),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.3, p=p["gamma"] / 2),
            A.Downscale(scale_range=(0.4, 0.8), p=p["downscale"]),
            A.ImageCompression(quality_range=(25, 85), p=p["jpeg"]),
        ]
    )


class MicroscopyAugment:
    """Photometric microscopy augmentation of an ultralytics sample (``labels["img"]``).

    Parameters
    ----------
    probabilities : dict, optional
        Per-effect probability, keys of :data:`PHOTOMETRIC_DEFAULTS` (missing keys take the
        default; 0 turns an effect off).
    seed : int, optional
        Seed of the custom effects' generator (albumentations follows Python's ``random``,
        which ultralytics seeds).
    """

    def __init__(self, probabilities: dict[str, float] | None = None, seed: int | None = None):
        unknown = set(probabilities or {}) - set(PHOTOMETRIC_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown augmentation effects: {sorted(unknown)}")
        self.p = {**PHOTOMETRIC_DEFAULTS, **(probabilities or {})}
        self.rng = np.random.default_rng(seed)
        self._pipeline = _albumentations_pipeline(self.p)

    def __call__(self, labels: dict[str, Any]) -> dict[str, Any]:
        img = labels.get("img")
        if img is None or not isinstance(img, np.ndarray):
            return labels
        grey = img[..., 0] if img.ndim == 3 else img
        grey = self.apply(np.ascontiguousarray(grey))
        labels["img"] = np.repeat(grey[..., None], 3, axis=2) if img.ndim == 3 else grey
        return labels

    def apply(self, grey: np.ndarray) -> np.ndarray:
        """Augment one 8-bit grey image (H, W); returns a new uint8 array of the same shape."""
        out = self._saturate(grey) if self.rng.random() < self.p["saturate"] else grey
        out = self._pipeline(image=out)["image"]
        if self.rng.random() < self.p["noise"]:
            out = self._camera_noise(out)
        if self.rng.random() < self.p["quantise"]:
            out = self._quantise(out)
        return np.asarray(out, dtype=np.uint8)

    def _saturate(self, img: np.ndarray) -> np.ndarray:
        # A longer exposure: bright nuclei clip at the top, dim ones become visible.
        gain = self.rng.uniform(1.3, 3.0)
        return np.clip(img.astype(np.float32) * gain, 0, 255).astype(np.uint8)

    def _camera_noise(self, img: np.ndarray) -> np.ndarray:
        # Poisson shot noise at a random photon budget, plus Gaussian read noise.
        photons = self.rng.uniform(5.0, 60.0)  # photons at full scale (255)
        lam = img.astype(np.float32) / 255.0 * photons
        noisy = self.rng.poisson(lam).astype(np.float32) * (255.0 / photons)
        noisy += self.rng.normal(0.0, self.rng.uniform(1.0, 6.0), img.shape)
        return np.clip(noisy, 0, 255).astype(np.uint8)

    def _quantise(self, img: np.ndarray) -> np.ndarray:
        # A dim 8-bit (or 12-bit binned) image stretched to full range keeps few grey levels.
        levels = int(self.rng.integers(8, 48))
        step = 255.0 / (levels - 1)
        return np.clip(np.round(img.astype(np.float32) / step) * step, 0, 255).astype(np.uint8)


def insert_into(dataset: Any, augment: MicroscopyAugment) -> None:
    """Put ``augment`` into an ultralytics dataset's transforms, just before tensor formatting.

    The dataset rebuilds its transforms when mosaic closes (``close_mosaic``); its
    ``build_transforms`` is wrapped so the rebuilt chain keeps ``augment``.

    Parameters
    ----------
    dataset : ultralytics ``YOLODataset``
        Its ``transforms`` is a ``Compose`` whose last step formats the tensors.
    augment : MicroscopyAugment
    """
    _insert(dataset.transforms, augment)
    build = getattr(dataset, "build_transforms", None)
    if build is not None and not getattr(build, "_yolocell_augment", False):

        def build_transforms(hyp=None):
            transforms = build(hyp)
            _insert(transforms, augment)
            return transforms

        build_transforms._yolocell_augment = True  # type: ignore[attr-defined]
        dataset.build_transforms = build_transforms


def _insert(transforms: Any, augment: MicroscopyAugment) -> None:
    steps = transforms.transforms
    if any(t is augment for t in steps):
        return
    names = [type(t).__name__ for t in steps]
    at = names.index("Format") if "Format" in names else len(steps)
    steps.insert(at, augment)
