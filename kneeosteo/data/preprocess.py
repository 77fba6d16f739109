"""Turn a canonical greyscale radiograph into the tensor a network eats.

Three presets:
- ``paper``: stretch to 224x224 (aspect ratio ignored, as the paper does), 3 identical channels,
  normalised with the backbone's mean/std.
- ``robust``: aspect-preserving letterbox onto a black square, optional CLAHE. Stretching makes a
  tall narrow film look different from a square one, which lets a network read the *source*
  (a label shortcut the audit finds on KOP) instead of bone; the letterbox removes that cue.
- ``bone``: as ``robust``, after everything outside the label-free bone region
  (:func:`kneeosteo.data.bone.bone_mask`) is set to black: the film's border, padding, soft tissue
  and burnt-in text (what a network can read of the film's source outside the bone) never reach it.
- ``knee``: the knee joint's region (:func:`kneeosteo.data.knee.find_knees`, label-free): a
  square centred on the joint, ``ROI_SCALE`` (2) tibial plateau widths on a side, resampled to
  ``size`` (384-512 is the intended range), so every framing (close knee, long shin, whole leg)
  reaches the network at one anatomical scale and without the framing. A film holding two
  knees gives one view per knee (:meth:`Preprocess.knee_views`; prediction scores each and
  aggregates); ``geometry`` (training, one tensor per film) takes the left one. A film where no
  knee is found is letterboxed whole for training (0 of KOP's 372 films); prediction refuses it
  (``out_of_domain``, with the reason).

Two forms of the same pixels: ``geometry``, ``normalise`` and calling the object give torch tensors
(training, the torch engines); ``geometry_array``, ``normalise_array`` and ``array`` give NumPy
arrays without importing torch (the ONNX Runtime engine: ``kneeosteo predict`` starts without it,
issue 29). They differ only in the one resize, PyTorch's antialiased bilinear in the first and
:func:`kneeosteo.data.resample.resize_bilinear_aa` in the second, which gives PyTorch's values bit
for bit (on x86-64; elsewhere the array form calls PyTorch for that one step).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from kneeosteo.choices import PRESETS  # re-exported: defined where the command line reads it cheaply
from kneeosteo.data.bone import bone_mask
from kneeosteo.data.knee import LOCALISER_VERSION, Knee, KneeSearch, find_knees, knee_roi
from kneeosteo.data.resample import resize_bilinear_aa, torch_rounding

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def scaled_size(h: int, w: int, longest: int) -> tuple[int, int]:
    """(h, w) scaled so that the longer side is ``longest``, aspect kept, each side at least 1."""
    scale = longest / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _resize_torch(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PyTorch's antialiased bilinear resize of an (H, W) float32 image (training's, the reference)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(img))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()


def _resize_numpy(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The same values without torch (:mod:`kneeosteo.data.resample`); PyTorch's own where its
    kernel's rounding is not known here (not x86-64)."""
    rounding = torch_rounding()
    return _resize_torch(img, size) if rounding is None else resize_bilinear_aa(img, size, rounding)


@dataclass(frozen=True)
class Preprocess:
    preset: str = "paper"
    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    clahe: bool = False

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preprocessing preset {self.preset!r} (choose from {PRESETS})")

    def key(self) -> str:
        """Stable id of everything that changes the pixels; part of every cache key ('knee': with
        the localiser's version, so a changed localiser never reads regions cut by the old one)."""
        doc = asdict(self) if self.preset != "knee" else {**asdict(self), "localiser": LOCALISER_VERSION}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def geometry(self, pixels: np.ndarray, knee: Knee | None = None) -> torch.Tensor:
        """(H, W) float [0,1] -> (1, S, S) float32 [0,1]: the resized picture before normalisation.
        'knee': the region of ``knee`` (default: the first knee found; none found: the whole film
        letterboxed, see the module doc)."""
        import torch

        return torch.from_numpy(self._geometry(pixels, knee, _resize_torch))

    def geometry_array(self, pixels: np.ndarray, knee: Knee | None = None) -> np.ndarray:
        """:meth:`geometry` as a NumPy array, without torch (the same values)."""
        return self._geometry(pixels, knee, _resize_numpy)

    def _geometry(self, pixels: np.ndarray, knee: Knee | None, resize) -> np.ndarray:
        img = np.ascontiguousarray(pixels, dtype=np.float32)
        if self.preset == "knee":
            if knee is None:
                found = find_knees(img).knees
                knee = found[0] if found else None
            if knee is not None:
                return np.clip(self._clahe(knee_roi(img, knee, self.size)), 0, 1)[None]
        if self.preset == "bone":  # the mask is found on the picture as read, before any contrast change
            img = np.where(bone_mask(img), img, np.float32(0))
        img = self._clahe(img)
        s = self.size
        if self.preset == "paper":
            out = resize(img, (s, s))
        else:
            top, left, nh, nw = self.content_box(*img.shape)
            out = np.zeros((s, s), np.float32)
            out[top : top + nh, left : left + nw] = resize(img, (nh, nw))
        return np.clip(out, 0, 1)[None]

    def _clahe(self, img: np.ndarray) -> np.ndarray:
        if not self.clahe:
            return img
        import cv2

        u16 = np.round(img * 65535).astype(np.uint16)
        return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(u16).astype(np.float32) / 65535

    def knee_views(self, pixels: np.ndarray) -> tuple[KneeSearch, list[torch.Tensor]]:
        """'knee': the knees found and one normalised (3, S, S) input per knee (none found: no
        input, and the search's reason). Other presets: no search, the film's one input."""
        if self.preset != "knee":
            return KneeSearch(()), [self(pixels)]
        found = find_knees(pixels)
        return found, [self.normalise(self.geometry(pixels, k)) for k in found.knees]

    def knee_views_array(self, pixels: np.ndarray) -> tuple[KneeSearch, list[np.ndarray]]:
        """:meth:`knee_views` with NumPy arrays, without torch."""
        if self.preset != "knee":
            return KneeSearch(()), [self.array(pixels)]
        found = find_knees(pixels)
        return found, [self.normalise_array(self.geometry_array(pixels, k)) for k in found.knees]

    def content_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        """Where an (h, w) image lands in the S x S network input: ``(top, left, height, width)``.
        'paper' stretches it over the whole square; 'robust' and 'bone' letterbox it, centred. The one
        place this arithmetic lives: Grad-CAM and the web overlays crop maps back with it. ('knee'
        fills the square with the knee's region: maps go back to that region, ``Knee.box``.)"""
        s = self.size
        if self.preset in ("paper", "knee"):
            return 0, 0, s, s
        nh, nw = scaled_size(h, w, s)
        return (s - nh) // 2, (s - nw) // 2, nh, nw

    def normalise(self, grey: torch.Tensor) -> torch.Tensor:
        """(..., 1, S, S) in [0,1] -> (..., 3, S, S) normalised; cheap enough to do per batch."""
        import torch

        mean = torch.tensor(self.mean, dtype=grey.dtype, device=grey.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=grey.dtype, device=grey.device).view(3, 1, 1)
        return (grey.expand(*grey.shape[:-3], 3, *grey.shape[-2:]) - mean) / std

    def normalise_array(self, grey: np.ndarray) -> np.ndarray:
        """:meth:`normalise` for float32 NumPy arrays (the same float32 arithmetic)."""
        mean = np.asarray(self.mean, dtype=grey.dtype).reshape(3, 1, 1)
        std = np.asarray(self.std, dtype=grey.dtype).reshape(3, 1, 1)
        return (np.broadcast_to(grey, (*grey.shape[:-3], 3, *grey.shape[-2:])) - mean) / std

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        return self.normalise(self.geometry(pixels))

    def array(self, pixels: np.ndarray) -> np.ndarray:
        """``self(pixels)`` as a float32 NumPy array, without torch: the ONNX Runtime engine's input."""
        return self.normalise_array(self.geometry_array(pixels))
