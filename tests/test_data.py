"""Built-in datasets: idx parsing, padding, the digits stand-in, errors, range conversions."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade_sd.data import (
    DigitsStandInWarning,
    ImageSet,
    dataset_fingerprint,
    load_images,
    to_model_range,
    to_uint8,
)
from cascade_sd.errors import ConfigError, DataError

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_images(images: np.ndarray, magic: int = 2051) -> bytes:
    n, h, w = images.shape
    return struct.pack(">IIII", magic, n, h, w) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray, magic: int = 2049) -> bytes:
    return struct.pack(">II", magic, labels.shape[0]) + labels.astype(np.uint8).tobytes()


def _write(path: Path, data: bytes, gz: bool) -> None:
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def _make_fashion(root: Path, n: int = 12, gz: bool = False, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, (img_name, lbl_name) in FILES.items():
        images = rng.integers(1, 256, size=(n, 28, 28)).astype(np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        _write(root / img_name, _idx_images(images), gz)
        _write(root / lbl_name, _idx_labels(labels), gz)
        out[split] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip_and_padding(tmp_path: Path, gz: bool) -> None:
    truth = _make_fashion(tmp_path, gz=gz)
    for split in ("train", "test"):
        data = load_images("fashion-mnist", split, root=str(tmp_path))
        images, labels = truth[split]
        assert isinstance(data, ImageSet) and data.split == split and data.source == "fashion-mnist"
        assert data.images.shape == (12, 1, 32, 32) and data.images.dtype == torch.uint8
        assert data.labels.dtype == torch.int64 and data.labels.tolist() == labels.tolist()
        assert torch.equal(data.images[:, 0, 2:30, 2:30], torch.from_numpy(images))
        frame = data.images.clone()
        frame[:, :, 2:30, 2:30] = 0
        assert int(frame.sum()) == 0
        assert data.num_classes == 10 and len(data.class_names) == 10


def test_limit_takes_first_examples(tmp_path: Path) -> None:
    truth = _make_fashion(tmp_path)
    data = load_images("fashion-mnist", "train", root=str(tmp_path), limit=5)
    assert len(data) == 5
    assert torch.equal(data.images[:, 0, 2:30, 2:30], torch.from_numpy(truth["train"][0][:5]))
    with pytest.raises(ConfigError, match="data.limit"):
        load_images("fashion-mnist", "train", root=str(tmp_path), limit=0)


def test_bad_magic_is_data_error(tmp_path: Path) -> None:
    _make_fashion(tmp_path)
    images = np.zeros((12, 28, 28), dtype=np.uint8)
    (tmp_path / FILES["train"][0]).write_bytes(_idx_images(images, magic=2049))
    with pytest.raises(DataError, match="magic number 2049, expected 2051"):
        load_images("fashion-mnist", "train", root=str(tmp_path))


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_file_names_the_file(tmp_path: Path, gz: bool) -> None:
    _make_fashion(tmp_path, gz=gz)
    name = FILES["test"][0] + (".gz" if gz else "")
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DataError, match=name):
        load_images("fashion-mnist", "test", root=str(tmp_path))


def test_count_mismatch_is_data_error(tmp_path: Path) -> None:
    _make_fashion(tmp_path)
    (tmp_path / FILES["train"][1]).write_bytes(_idx_labels(np.zeros(11, dtype=np.uint8)))
    with pytest.raises(DataError, match="disagree"):
        load_images("fashion-mnist", "train", root=str(tmp_path))


def test_missing_folder_explains_how_to_get_data(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_images("fashion-mnist", "train", root=str(tmp_path / "nowhere"))
    msg = str(info.value)
    assert "\n" not in msg
    assert "nowhere" in msg and "dataset-fashion-mnist" in msg and "digits" in msg and "data.root" in msg


def test_unknown_source_and_split_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="data.source"):
        load_images("cifar10", "train")
    with pytest.raises(ConfigError, match="data.split"):
        load_images("digits", "val")


def test_digits_stand_in() -> None:
    with pytest.warns(DigitsStandInWarning, match="stand-in"):
        train = load_images("digits", "train")
    with pytest.warns(DigitsStandInWarning):
        test = load_images("digits", "test")
    with pytest.warns(DigitsStandInWarning):
        again = load_images("digits", "train", limit=100)
    assert train.images.shape == (1437, 1, 32, 32) and test.images.shape == (360, 1, 32, 32)
    assert train.images.dtype == torch.uint8 and int(train.images.max()) == 255 and int(train.images.min()) == 0
    assert train.source == "digits" and train.class_names[3] == "3"
    assert int(train.images[:, :, :2].sum()) == 0 and int(train.images[:, :, :, 30:].sum()) == 0
    assert torch.equal(again.images, train.images[:100]) and torch.equal(again.labels, train.labels[:100])
    counts_train = torch.bincount(train.labels, minlength=10).double()
    counts_test = torch.bincount(test.labels, minlength=10).double()
    assert torch.allclose(counts_test / counts_train, torch.full((10,), 0.25, dtype=torch.float64), atol=0.03)


def test_range_conversions_roundtrip() -> None:
    x = torch.arange(256, dtype=torch.uint8)
    y = to_model_range(x)
    assert y.dtype == torch.float32 and float(y.min()) == -1.0 and float(y.max()) == 1.0
    assert torch.equal(to_uint8(y), x)
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


def test_fingerprint(tmp_path: Path) -> None:
    _make_fashion(tmp_path, gz=True)
    fp = dataset_fingerprint("fashion-mnist", str(tmp_path))
    assert len(fp["files"]) == 4
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in fp["files"])
    digits = dataset_fingerprint("digits")
    assert digits["files"][0]["name"] == "digits.csv.gz"
