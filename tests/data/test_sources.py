"""Sources: aligned arrays and map-style datasets, gathered a whole batch at a time."""

import numpy as np
import pytest
import torch

from batchfit import ArraySource, BatchfitError, DatasetSource
from batchfit.data.sources import as_source


def indices(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


class PairDataset(torch.utils.data.Dataset):
    """(features, label) per sample, one Python call per sample."""

    def __init__(self, n: int = 10) -> None:
        self.x = np.arange(n * 2, dtype=np.float64).reshape(n, 2)
        self.y = np.arange(n) % 3

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


class BatchedDataset(PairDataset):
    """The same samples, with ``__getitems__`` returning an already collated batch."""

    def __init__(self, n: int = 10) -> None:
        super().__init__(n)
        self.calls = 0

    def __getitems__(self, index_list):
        self.calls += 1
        return torch.from_numpy(self.x[index_list]), torch.from_numpy(self.y[index_list])


class DictDataset(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int):
        return {"inputs": torch.full((3,), float(i)), "labels": torch.tensor(i)}


def test_array_source_tuple_batches_gather_rows():
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = np.arange(10)
    batch = ArraySource(x, y).gather(indices(3, 0, 7))
    assert isinstance(batch, tuple) and len(batch) == 2
    assert torch.equal(batch[0], torch.tensor(x[[3, 0, 7]]))
    assert torch.equal(batch[1], torch.tensor([3, 0, 7]))


def test_array_source_named_arrays_give_dict_batches():
    src = ArraySource(features=np.ones((4, 2)), target=torch.arange(4))
    batch = src.gather(indices(1, 2))
    assert list(batch) == ["features", "target"]
    assert torch.equal(batch["target"], torch.tensor([1, 2]))
    assert src.names == ("features", "target")


def test_array_source_shares_contiguous_numpy_memory():
    x = np.zeros((5, 2), dtype=np.float32)
    src = ArraySource(x, np.zeros(5))
    x[4, 1] = 7.0  # seen through the source: no copy was made
    assert src.gather(indices(4))[0][0, 1] == 7.0


def test_array_source_batches_are_fresh_tensors():
    x = np.arange(6, dtype=np.float32)
    src = ArraySource(x)
    first = src.gather(indices(0, 1))
    src.gather(indices(4, 5))
    assert torch.equal(first[0], torch.tensor([0.0, 1.0]))


def test_array_source_mismatched_lengths():
    with pytest.raises(ValueError, match=r"same number of samples.*Received lengths.*10.*9"):
        ArraySource(np.zeros((10, 2)), np.zeros(9))


def test_array_source_no_arrays():
    with pytest.raises(BatchfitError, match=r"`arrays` must be at least one array"):
        ArraySource()


def test_array_source_positional_and_named():
    with pytest.raises(BatchfitError, match=r"either positional arrays or named arrays"):
        ArraySource(np.zeros(3), y=np.zeros(3))


def test_array_source_object_array():
    with pytest.raises(BatchfitError, match=r"`arrays\[0\]` must be a numeric array\. Received:.*object"):
        ArraySource(np.array([{}, {}], dtype=object))


def test_array_source_scalar():
    with pytest.raises(BatchfitError, match=r"first dimension counts samples.*0-d"):
        ArraySource(np.array(3.0, dtype=np.float32))


def test_array_source_wrong_type():
    with pytest.raises(BatchfitError, match=r"`x` must be a numpy array or a torch tensor\. Received: x='str'"):
        ArraySource(x="not an array")


def test_as_source_empty_data():
    with pytest.raises(ValueError, match=r"`train` must be at least one sample\. Received: .*0 samples"):
        as_source((np.zeros((0, 3)), np.zeros(0)), "train")


def test_as_source_unknown_type():
    with pytest.raises(ValueError, match=r"`train` must be a source, a tuple of arrays.*Received: train='int'"):
        as_source(3, "train")


def test_as_source_tuple_dict_and_dataset():
    x, y = np.zeros((4, 2)), np.arange(4)
    assert as_source((x, y)).names is None
    assert as_source({"x": x, "y": y}).names == ("x", "y")
    assert isinstance(as_source(PairDataset()), DatasetSource)
    src = ArraySource(x, y)
    assert as_source(src) is src


def test_dataset_source_without_getitems_collates_samples():
    dataset = PairDataset()
    batch = DatasetSource(dataset).gather(indices(2, 5))
    assert torch.equal(batch[0], torch.tensor(dataset.x[[2, 5]]))
    assert torch.equal(batch[1], torch.tensor([2, 2]))


def test_dataset_source_with_getitems_calls_it_once_per_batch():
    dataset = BatchedDataset()
    batch = DatasetSource(dataset).gather(indices(9, 1, 4))
    assert dataset.calls == 1
    assert torch.equal(batch[0], torch.tensor(dataset.x[[9, 1, 4]]))
    assert torch.equal(batch[1], torch.tensor([0, 1, 1]))


def test_dataset_source_dict_samples_give_dict_batches():
    src = DatasetSource(DictDataset())
    assert src.names == ("inputs", "labels")
    batch = src.gather(indices(5, 0))
    assert torch.equal(batch["labels"], torch.tensor([5, 0]))
    assert batch["inputs"].shape == (2, 3)


def test_dataset_source_not_a_dataset():
    with pytest.raises(BatchfitError, match=r"`dataset` must be a map-style Dataset.*Received: dataset='int'"):
        DatasetSource(5)
