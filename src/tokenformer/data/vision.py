"""Image classification data: Fashion-MNIST (IDX files) and CIFAR-10 (python archive), batched.

Both load into an :class:`ImageDataset` (``uint8 [N, C, H, W]`` images, ``int64 [N]`` labels);
:class:`ImageBatches` turns one into normalised float batches ``([B, C, H, W], [B])`` with
optional random-crop and horizontal-flip augmentation. Batch order and augmentation depend only
on ``(seed, epoch, batch index)``, so a resumed run sees exactly the batches it would have seen.

CIFAR-10's archive is a set of Python pickles. Unpickling can run arbitrary code, so the loader
uses an unpickler that only accepts the few NumPy functions that rebuild an array and refuses
everything else.
"""

from __future__ import annotations

import codecs
import gzip
import io
import math
import pickle
import struct
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..validation import is_int, is_number

try:  # NumPy >= 2 (and the forward-compatibility alias of 1.26)
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # pragma: no cover - older NumPy
    from numpy.core import multiarray as _np_multiarray
    from numpy.core import numeric as _np_numeric

SPLITS = ("train", "test")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class ImageDataset:
    """Images ``uint8 [N, C, H, W]``, labels ``int64 [N]`` in ``0 .. len(classes) - 1``."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be int64 [N] with N={self.images.shape[0]} (one per image), "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(self.classes):
            raise ValueError(
                f"labels must lie in 0..{len(self.classes) - 1} ({len(self.classes)} classes), "
                f"got {int(self.labels.min())}..{int(self.labels.max())}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.images.shape[1:])


def channel_stats(dataset: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std ``[C]`` of the pixels scaled to [0, 1] (take them from the training split)."""
    pixels = dataset.images.transpose(0, 1).reshape(dataset.images.shape[1], -1).double() / 255.0
    return pixels.mean(dim=1).float(), pixels.std(dim=1).float()


# ---------------------------------------------------------------------------------------------
# IDX (the MNIST family's format): 0x00 0x00 <element type> <ndim>, ndim big-endian uint32
# sizes, then the elements big-endian.

IDX_TYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: cannot decompress this gzip file (truncated or corrupted?): {exc}") from exc


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file, plain or gzip-compressed."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_TYPES or raw[3] == 0:
        allowed = ", ".join(f"0x{code:02x}" for code in IDX_TYPES)
        raise ValueError(
            f"{path}: not an IDX file: header starts with {raw[:4].hex(' ') or 'nothing'}, expected "
            f"00 00 <element type, one of {allowed}> <number of dimensions >= 1>"
        )
    ndim, dtype = raw[3], IDX_TYPES[raw[2]]
    data_start = 4 + 4 * ndim
    if len(raw) < data_start:
        raise ValueError(
            f"{path}: IDX header declares {ndim} dimensions ({4 * ndim} bytes of sizes) "
            f"but the file ends after {len(raw)} bytes"
        )
    shape = struct.unpack(f">{ndim}I", raw[4:data_start])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - data_start != expected:
        raise ValueError(
            f"{path}: IDX header declares shape {list(shape)} of {dtype.name} ({expected} bytes of data), "
            f"but the file holds {len(raw) - data_start} bytes after the header (truncated or corrupted?)"
        )
    array = np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=data_start).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}; on Debian/Ubuntu `apt-get install "
        f"dataset-fashion-mnist` puts the files in {FASHION_MNIST_DIR}, or pass the directory that holds them"
    )


def load_fashion_mnist(root: str | Path = FASHION_MNIST_DIR, split: str = "train") -> ImageDataset:
    """Fashion-MNIST from its four standard IDX files (60,000 train / 10,000 test, 28x28 grey, 10 classes)."""
    _check_split(split)
    root = Path(root)
    prefix = "train" if split == "train" else "t10k"
    images_path, labels_path = (
        _find_idx(root, f"{prefix}-images-idx3-ubyte"),
        _find_idx(root, f"{prefix}-labels-idx1-ubyte"),
    )
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(
            f"{images_path}: expected uint8 images of shape [N, 28, 28], got {images.dtype} {list(images.shape)}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"{labels_path}: expected {len(images)} uint8 labels (one per image in {images_path.name}), "
            f"got {labels.dtype} {list(labels.shape)}"
        )
    if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{labels_path}: labels must lie in 0..9 (10 classes), found {labels.max()}")
    return ImageDataset(
        torch.from_numpy(images)[:, None], torch.from_numpy(labels.astype(np.int64)), FASHION_MNIST_CLASSES
    )


# ---------------------------------------------------------------------------------------------
# CIFAR-10, "python version": cifar-10-batches-py/{data_batch_1..5,test_batch}, each a pickled
# dict with b"data" (uint8 [10000, 3072], channel-major 32x32 planes) and b"labels" (list of int).

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
# What pickled NumPy arrays and Python-3-written protocol-2 bytes need, under every module name
# NumPy 1 and 2 write; nothing here can run code of the file's choosing.
_SAFE_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _np_numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _np_numeric._frombuffer,
    ("_codecs", "encode"): codecs.encode,
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something other than plain data and NumPy arrays."""


class _ArrayUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, source: str) -> None:
        # encoding="bytes": the archive was written by Python 2, its str keys load as bytes.
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_GLOBALS:
            raise UnsafePickleError(
                f"{self.source}: refusing to load {module}.{name}: a CIFAR-10 batch may only hold dicts, lists, "
                f"bytes, numbers and NumPy arrays (this file is not a CIFAR-10 batch, or it was tampered with)"
            )
        return _SAFE_GLOBALS[(module, name)]

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: refusing persistent id {pid!r}: not a CIFAR-10 batch")


def load_array_pickle(data: bytes, source: str) -> object:
    """Unpickle ``data`` allowing only plain data and NumPy arrays; ``source`` names it in errors."""
    try:
        return _ArrayUnpickler(data, source).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # a damaged pickle can fail in many ways
        raise ValueError(f"{source}: not a readable pickle (truncated or corrupted?): {exc}") from exc


def _cifar_batch(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    batch = load_array_pickle(data, source)
    if not isinstance(batch, dict):
        raise ValueError(f"{source}: expected a dict with b'data' and b'labels', got {type(batch).__name__}")
    images, labels = batch.get(b"data", batch.get("data")), batch.get(b"labels", batch.get("labels"))
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 2
        or images.shape[1] != 3 * 32 * 32
    ):
        got = f"{images.dtype} {list(images.shape)}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"{source}: expected b'data' as a uint8 array [N, 3072], got {got}")
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{source}: expected b'labels' as {len(images)} integers, got {labels.dtype} {list(labels.shape)}"
        )
    if len(labels) and not 0 <= labels.min() <= labels.max() < len(CIFAR10_CLASSES):
        raise ValueError(f"{source}: labels must lie in 0..9 (10 classes), found {labels.min()}..{labels.max()}")
    return images.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar_members(path: Path, names: tuple[str, ...]) -> Iterator[tuple[str, bytes]]:
    """``(source, bytes)`` of each batch, from the .tar.gz archive or its extracted directory."""
    if path.is_dir():
        folder = path / _CIFAR_DIR if (path / _CIFAR_DIR).is_dir() else path
        for name in names:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"CIFAR-10 batch {name} not found in {folder}; expected {', '.join(names)}")
            yield str(folder / name), (folder / name).read_bytes()
        return
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 archive not found: {path} (give cifar-10-python.tar.gz or its extracted {_CIFAR_DIR} directory)"
        )
    try:
        with tarfile.open(path, "r:*") as archive:
            for name in names:
                member = f"{_CIFAR_DIR}/{name}"
                try:
                    stream = archive.extractfile(member)
                except KeyError:
                    stream = None
                if stream is None:
                    raise FileNotFoundError(
                        f"{path}: archive has no file {member}; expected {', '.join(names)} in {_CIFAR_DIR}/"
                    )
                yield f"{path}:{member}", stream.read()
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: not a readable tar archive (truncated or corrupted?): {exc}") from exc


def load_cifar10(path: str | Path, split: str = "train") -> ImageDataset:
    """CIFAR-10 from ``cifar-10-python.tar.gz`` (or its extracted directory): 50,000 train / 10,000 test, 32x32 RGB."""
    _check_split(split)
    parts = [_cifar_batch(data, source) for source, data in _cifar_members(Path(path), _CIFAR_BATCHES[split])]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), CIFAR10_CLASSES)


# ---------------------------------------------------------------------------------------------

VISION_DATASETS = ("fashion-mnist", "cifar10")


def load_image_dataset(name: str, path: str | Path | None = None, split: str = "train") -> ImageDataset:
    """A dataset by name; ``path`` defaults to the Debian location for Fashion-MNIST."""
    if name == "fashion-mnist":
        return load_fashion_mnist(FASHION_MNIST_DIR if path is None else path, split)
    if name == "cifar10":
        if path is None:
            raise ValueError(
                "cifar10 needs a path: cifar-10-python.tar.gz or its extracted cifar-10-batches-py directory"
            )
        return load_cifar10(path, split)
    raise ValueError(f"unknown image dataset {name!r}; allowed: {', '.join(VISION_DATASETS)}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")


class ImageBatches:
    """Normalised float batches ``(images [B, C, H, W], labels int64 [B])`` of an :class:`ImageDataset`.

    ``mean``/``std`` (per channel, pixels in [0, 1]) come from the training split (see
    :func:`channel_stats`). ``crop_padding=p`` pads each image by ``p`` black pixels and takes a
    random crop of the original size; ``hflip`` mirrors half the images. ``erase_prob=q`` is random
    erasing (Zhong et al., 2020): with probability ``q`` an image gets one rectangle of random
    pixel values, covering 2-40% of its area with an aspect ratio between 0.3 and 3.3 (clipped to
    the frame). All of them, and the shuffled order, are drawn from ``(seed, epoch, batch index)`` only.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        mean: torch.Tensor,
        std: torch.Tensor,
        *,
        shuffle: bool = False,
        crop_padding: int = 0,
        hflip: bool = False,
        erase_prob: float = 0.0,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not is_int(crop_padding) or crop_padding < 0:
            raise ValueError(f"crop_padding must be a non-negative integer (pixels), got {crop_padding!r}")
        if not is_number(erase_prob) or not 0 <= erase_prob <= 1:
            raise ValueError(f"erase_prob must be a probability in [0, 1], got {erase_prob!r}")
        channels = dataset.images.shape[1]
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != (channels,) or std.shape != (channels,) or bool((std <= 0).any()):
            raise ValueError(
                f"mean and std must hold one value per channel ({channels}), std > 0; "
                f"got mean {mean.tolist()}, std {std.tolist()}"
            )
        self.dataset, self.batch_size = dataset, batch_size
        self.shuffle, self.crop_padding, self.hflip, self.drop_last, self.seed = (
            shuffle,
            crop_padding,
            hflip,
            drop_last,
            seed,
        )
        self.erase_prob = float(erase_prob)
        # Batches are put together in NumPy: on a busy CPU, torch's small indexing ops pay for
        # waking its thread pool and take far longer.
        self._images, self._labels = dataset.images.numpy(), dataset.labels.numpy()
        self._scale = (1.0 / (255.0 * std)).numpy().reshape(1, -1, 1, 1)
        self._shift = (mean / std).numpy().reshape(1, -1, 1, 1)

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of epoch ``epoch`` from batch index ``start`` on (to resume mid-epoch)."""
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        for index in range(start, len(self)):
            rows = order[index * self.batch_size : (index + 1) * self.batch_size]
            images = self._images[rows]
            if self.crop_padding or self.hflip or self.erase_prob:
                images = self._augment(images, np.random.default_rng([self.seed, epoch, index]))
            normalised = images.astype(np.float32) * self._scale - self._shift
            yield torch.from_numpy(normalised), torch.from_numpy(self._labels[rows])

    def _augment(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        batch, channels, height, width = images.shape
        if self.crop_padding:
            p = self.crop_padding
            padded = np.pad(images, ((0, 0), (0, 0), (p, p), (p, p)))
            top = rng.integers(0, 2 * p + 1, (batch, 1)) + np.arange(height)
            left = rng.integers(0, 2 * p + 1, (batch, 1)) + np.arange(width)
            images = padded[
                np.arange(batch)[:, None, None, None],
                np.arange(channels)[None, :, None, None],
                top[:, None, :, None],
                left[:, None, None, :],
            ]
        if self.hflip:
            flip = rng.random(batch) < 0.5
            images = np.where(flip[:, None, None, None], images[..., ::-1], images)
        if self.erase_prob:
            images = _random_erase(images, self.erase_prob, rng)
        return images


ERASE_AREA = (0.02, 0.4)
ERASE_ASPECT = (0.3, 1 / 0.3)


def _random_erase(images: np.ndarray, prob: float, rng: np.random.Generator) -> np.ndarray:
    """Random erasing of ``images [B, C, H, W]`` (uint8): each image, with probability ``prob``,
    gets one rectangle (area a share of ``ERASE_AREA``, aspect drawn log-uniformly from
    ``ERASE_ASPECT``, clipped to the frame) filled with uniform random pixel values."""
    batch, _, height, width = images.shape
    erase = rng.random(batch) < prob
    area = rng.uniform(*ERASE_AREA, batch) * height * width
    aspect = np.exp(rng.uniform(*np.log(ERASE_ASPECT), batch))
    h = np.clip(np.round(np.sqrt(area * aspect)), 1, height).astype(np.int64)
    w = np.clip(np.round(np.sqrt(area / aspect)), 1, width).astype(np.int64)
    top = (rng.random(batch) * (height - h + 1)).astype(np.int64)
    left = (rng.random(batch) * (width - w + 1)).astype(np.int64)
    rows, cols = np.arange(height), np.arange(width)
    inside_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])
    inside_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])
    mask = erase[:, None, None, None] & inside_rows[:, None, :, None] & inside_cols[:, None, None, :]
    noise = rng.integers(0, 256, images.shape, dtype=np.uint8)
    return np.where(mask, noise, images)
