import gzip
import io
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch

from tokenformer.data.vision import (
    CIFAR10_CLASSES,
    FASHION_MNIST_DIR,
    ImageBatches,
    ImageDataset,
    UnsafePickleError,
    channel_stats,
    load_array_pickle,
    load_cifar10,
    load_fashion_mnist,
    load_image_dataset,
    read_idx,
)

IDX_CODES = {np.dtype("u1"): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding, written out from the format's definition."""
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    header = bytes([0, 0, IDX_CODES[big_endian.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + big_endian.tobytes()


def write_idx(path, array, compress=False):
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", ["u1", ">i4", ">f4"])
def test_idx_round_trip(tmp_path, compress, dtype):
    array = (np.arange(2 * 3 * 4) * 7 - 20).reshape(2, 3, 4)
    array = np.abs(array).astype(dtype) if dtype == "u1" else array.astype(dtype)
    out = read_idx(write_idx(tmp_path / "a.idx", array, compress))
    assert out.shape == (2, 3, 4) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_corrupted_idx_header_names_file_and_expectation(tmp_path):
    good = idx_bytes(np.zeros((4, 28, 28), np.uint8))
    bad_magic = tmp_path / "bad-magic"
    bad_magic.write_bytes(b"\x08\x03" + good[4:])
    with pytest.raises(
        ValueError, match=r"bad-magic: not an IDX file: header starts with 08 03 00 00, expected 00 00 <element type"
    ):
        read_idx(bad_magic)
    unknown_type = tmp_path / "unknown-type"
    unknown_type.write_bytes(b"\0\0\x07\x03" + good[4:])
    with pytest.raises(ValueError, match="unknown-type: not an IDX file.*one of 0x08, 0x09"):
        read_idx(unknown_type)
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(gzip.compress(good[:-10]))
    with pytest.raises(
        ValueError,
        match=r"truncated.gz: IDX header declares shape \[4, 28, 28\] of uint8 \(3136 bytes of data\), "
        r"but the file holds 3126",
    ):
        read_idx(truncated)
    short_header = tmp_path / "short"
    short_header.write_bytes(good[:9])
    with pytest.raises(ValueError, match="short: IDX header declares 3 dimensions"):
        read_idx(short_header)
    broken_gzip = tmp_path / "broken.gz"
    broken_gzip.write_bytes(gzip.compress(good)[:40])
    with pytest.raises(ValueError, match="broken.gz: cannot decompress"):
        read_idx(broken_gzip)


def fake_fashion_mnist(root, n_train=30, n_test=10, compress=True):
    rng = np.random.default_rng(0)
    root.mkdir(exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            root / f"{prefix}-images-idx3-ubyte{'.gz' if compress else ''}",
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            compress,
        )
        write_idx(root / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    return root


def test_fashion_mnist_from_tiny_files(tmp_path):
    root = fake_fashion_mnist(tmp_path / "fm")
    train, test = load_fashion_mnist(root, "train"), load_image_dataset("fashion-mnist", root, "test")
    assert train.images.shape == (30, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.labels.tolist() == list(range(10)) and test.labels.dtype == torch.int64
    assert train.classes[0] == "T-shirt/top" and len(train.classes) == 10
    raw = read_idx(root / "train-images-idx3-ubyte.gz")
    assert torch.equal(train.images[:, 0], torch.from_numpy(raw))


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"train-images-idx3-ubyte\(.gz\) not found in .*apt-get install dataset-fashion-mnist"
    ):
        load_fashion_mnist(tmp_path)
    root = fake_fashion_mnist(tmp_path / "fm")
    write_idx(root / "t10k-labels-idx1-ubyte", np.zeros(9, np.uint8))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: expected 10 uint8 labels .*got uint8 \[9\]"):
        load_fashion_mnist(root, "test")
    write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((10, 32, 32), np.uint8), compress=True)
    with pytest.raises(ValueError, match=r"expected uint8 images of shape \[N, 28, 28\], got uint8 \[10, 32, 32\]"):
        load_fashion_mnist(root, "test")
    write_idx(root / "train-labels-idx1-ubyte", np.full(30, 10, np.uint8))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: labels must lie in 0..9 \(10 classes\), found 10"):
        load_fashion_mnist(root, "train")
    with pytest.raises(ValueError, match="unknown split 'valid'; allowed: train, test"):
        load_fashion_mnist(root, "valid")
    with pytest.raises(ValueError, match="unknown image dataset 'mnist'; allowed: fashion-mnist, cifar10"):
        load_image_dataset("mnist")
    with pytest.raises(ValueError, match="cifar10 needs a path"):
        load_image_dataset("cifar10")


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason=f"Fashion-MNIST not installed in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)
def test_installed_fashion_mnist():
    train, test = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.labels.bincount().tolist() == [6000] * 10 and test.labels.bincount().tolist() == [1000] * 10
    mean, std = channel_stats(train)
    assert 0.28 < mean.item() < 0.29 and 0.35 < std.item() < 0.36  # the published statistics


def cifar_batch(n, seed, protocol):
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"batch",
        b"labels": rng.integers(0, 10, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"img%d.png" % i for i in range(n)],
    }
    return batch, pickle.dumps(batch, protocol=protocol)


def fake_cifar_archive(path, members=None, protocol=2, per_batch=3):
    """A CIFAR-10 python archive: 5 train batches and a test batch of ``per_batch`` images each."""
    members = members or {}
    batches = {}
    with tarfile.open(path, "w:gz") as archive:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for seed, name in enumerate(names):
            batches[name], data = cifar_batch(per_batch, seed, protocol)
            data = members.get(name, data)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return batches


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_from_archive_and_directory(tmp_path, protocol):
    batches = fake_cifar_archive(tmp_path / "cifar-10-python.tar.gz", protocol=protocol)
    train = load_cifar10(tmp_path / "cifar-10-python.tar.gz", "train")
    assert train.images.shape == (15, 3, 32, 32) and train.classes == CIFAR10_CLASSES
    first = batches["data_batch_1"][b"data"][0]
    # A row holds the red, green and blue 32x32 planes one after another.
    assert torch.equal(train.images[0, 1], torch.from_numpy(first[1024:2048].reshape(32, 32)))
    assert train.labels[12:].tolist() == batches["data_batch_5"][b"labels"]
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz") as archive:
        archive.extractall(tmp_path / "x", filter="data")
    test = load_image_dataset("cifar10", tmp_path / "x", "test")
    assert test.labels.tolist() == batches["test_batch"][b"labels"]


class Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_cifar10_refuses_code_in_pickles(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    malicious = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [Exploit()]}, protocol=2)
    with pytest.raises(UnsafePickleError, match=r"test_batch: refusing to load (posix|os)\.system"):
        load_array_pickle(malicious, "test_batch")
    fake_cifar_archive(tmp_path / "evil.tar.gz", members={"data_batch_3": malicious})
    with pytest.raises(UnsafePickleError, match=r"evil.tar.gz:cifar-10-batches-py/data_batch_3: refusing"):
        load_cifar10(tmp_path / "evil.tar.gz")
    assert not (tmp_path / "pwned").exists()
    builtin = pickle.dumps(eval, protocol=4)  # globals outside NumPy are refused too, builtins included
    with pytest.raises(UnsafePickleError, match="refusing to load builtins.eval"):
        load_array_pickle(builtin, "x")


def test_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10 archive not found"):
        load_cifar10(tmp_path / "missing.tar.gz")
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar file at all")
    with pytest.raises(ValueError, match="junk.tar.gz: not a readable tar archive"):
        load_cifar10(tmp_path / "junk.tar.gz")
    wrong = pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    fake_cifar_archive(tmp_path / "wrong.tar.gz", members={"test_batch": wrong})
    with pytest.raises(
        ValueError, match=r"test_batch: expected b'data' as a uint8 array \[N, 3072\], got uint8 \[2, 100\]"
    ):
        load_cifar10(tmp_path / "wrong.tar.gz", "test")
    fake_cifar_archive(
        tmp_path / "labels.tar.gz",
        members={"test_batch": pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]})},
    )
    with pytest.raises(ValueError, match=r"test_batch: labels must lie in 0..9 \(10 classes\), found 0..12"):
        load_cifar10(tmp_path / "labels.tar.gz", "test")
    fake_cifar_archive(tmp_path / "cut.tar.gz", members={"test_batch": pickle.dumps({b"a": 1})[:-3]})
    with pytest.raises(ValueError, match="test_batch: not a readable pickle"):
        load_cifar10(tmp_path / "cut.tar.gz", "test")


def small_dataset(n=10, channels=1, size=6):
    images = torch.arange(n * channels * size * size).remainder(251).to(torch.uint8).view(n, channels, size, size)
    return ImageDataset(images, torch.arange(n) % 3, ("a", "b", "c"))


def test_batches_normalise_and_cover_the_dataset():
    data = small_dataset(10)
    mean, std = channel_stats(data)
    batches = ImageBatches(data, 4, mean, std)
    out = list(batches)
    assert len(batches) == len(out) == 3 and [len(y) for _, y in out] == [4, 4, 2]
    images = torch.cat([x for x, _ in out])
    assert images.dtype == torch.float32 and images.shape == (10, 1, 6, 6)
    torch.testing.assert_close(images, (data.images.float() / 255 - mean) / std)
    assert abs(images.mean().item()) < 1e-5 and abs(images.std().item() - 1) < 1e-4
    assert len(ImageBatches(data, 4, mean, std, drop_last=True)) == 2


def test_batches_shuffle_deterministically_and_resume_mid_epoch():
    data = small_dataset(12)
    make = lambda: ImageBatches(data, 3, [0.5], [0.25], shuffle=True, crop_padding=1, hflip=True, seed=7)  # noqa: E731
    epoch1 = list(make().epoch(1))
    again = list(make().epoch(1))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(epoch1, again, strict=True))
    resumed = list(make().epoch(1, start=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch1[2:], resumed, strict=True))
    labels = [torch.cat([y for _, y in make().epoch(e)]) for e in (0, 1)]
    assert sorted(labels[0].tolist()) == sorted(data.labels.tolist()) and not torch.equal(labels[0], labels[1])


def test_augmentation_crops_and_flips_the_image():
    data = small_dataset(16, channels=2)
    raw = data.images.float()
    padded = torch.nn.functional.pad(raw, (2, 2, 2, 2))
    ((images, _),) = ImageBatches(data, 16, [0.0, 0.0], [1 / 255, 1 / 255], crop_padding=2, hflip=True).epoch(3)
    offsets = set()
    for image, source in zip(images, padded, strict=True):
        windows = [
            (dy, dx, flip)
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
            if torch.equal(
                image, (source[:, dy : dy + 6, dx : dx + 6].flip(-1) if flip else source[:, dy : dy + 6, dx : dx + 6])
            )
        ]
        assert windows, "every augmented image is a (mirrored) window of the padded original"
        offsets.add(windows[0])
    assert len(offsets) > 3  # different crops and flips across the batch


def test_random_erasing_puts_one_rectangle_of_noise_in_the_chosen_images():
    size, count = 20, 400
    data = ImageDataset(torch.zeros(count, 2, size, size, dtype=torch.uint8), torch.arange(count) % 3, ("a", "b", "c"))
    make = lambda prob: ImageBatches(data, count, [0.0, 0.0], [1 / 255, 1 / 255], erase_prob=prob, seed=3)  # noqa: E731
    ((images, _),) = make(0.5).epoch(2)
    ((again, _),) = make(0.5).epoch(2)
    assert torch.equal(images, again)  # drawn from (seed, epoch, batch index) only
    erased = 0
    for image in images:
        changed = (image != 0).any(dim=0)
        if not changed.any():
            continue
        erased += 1
        rows, cols = changed.any(dim=1).nonzero()[:, 0], changed.any(dim=0).nonzero()[:, 0]
        box = image[:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        area = box.shape[1] * box.shape[2]
        assert int(changed.sum()) == int((box != 0).any(dim=0).sum())  # every change lies in one box ...
        assert (box != 0).float().mean() > 0.9  # ... filled with noise (a random pixel is 0 one time in 256)
        assert 0.01 * size * size <= area <= 0.5 * size * size
    assert 0.4 < erased / count < 0.6
    ((untouched, _),) = make(0.0).epoch(2)
    assert not untouched.any()
    ((all_erased, _),) = make(1.0).epoch(2)
    assert all(image.any() for image in all_erased)


def test_batch_errors():
    data = small_dataset(4)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=rf"batch_size must be a positive integer, got {bad!r}"):
            ImageBatches(data, bad, [0.5], [0.2])
    with pytest.raises(
        ValueError, match=r"mean and std must hold one value per channel \(1\), std > 0; got mean \[0.5, 0.5\]"
    ):
        ImageBatches(data, 2, [0.5, 0.5], [0.2, 0.2])
    for bad in (-1, True, 1.0):
        with pytest.raises(ValueError, match=rf"crop_padding must be a non-negative integer \(pixels\), got {bad!r}"):
            ImageBatches(data, 2, [0.5], [0.2], crop_padding=bad)
    for bad in (1.5, -0.1, True):
        with pytest.raises(ValueError, match=rf"erase_prob must be a probability in \[0, 1\], got {bad!r}"):
            ImageBatches(data, 2, [0.5], [0.2], erase_prob=bad)
    with pytest.raises(ValueError, match=r"labels must lie in 0..2 \(3 classes\), got 0..3"):
        ImageDataset(data.images, torch.arange(4), ("a", "b", "c"))
    with pytest.raises(ValueError, match="images must be uint8"):
        ImageDataset(data.images.float(), data.labels, ("a", "b", "c"))
