import numpy as np
import pytest
import torch

from batchfit.data import convert as convert_module
from batchfit.data.convert import convert, verify_path
from batchfit.data.shards import read_manifest
from batchfit.errors import BatchfitError, ShardError


@pytest.fixture
def small_chunks(monkeypatch):
    """Read inputs in many small pieces, as a file larger than memory would be."""
    monkeypatch.setattr(convert_module, "CHUNK_BYTES", 256)
    monkeypatch.setattr(convert_module, "CSV_LINES", 7)


def _all(src):
    return src.gather(np.arange(len(src)))


def test_convert_npy_single_array(tmp_path, small_chunks):
    x = np.arange(300, dtype=np.float32).reshape(100, 3)
    np.save(tmp_path / "x.npy", x)
    src = convert(tmp_path / "x.npy", tmp_path / "out", shard_size=30)
    (got,) = _all(src)
    assert src.names is None and src.shard_sizes == [30, 30, 30, 10]
    np.testing.assert_array_equal(got.numpy(), x)


def test_convert_npy_target_column(tmp_path, small_chunks):
    data = np.arange(400, dtype=np.int64).reshape(100, 4)
    np.save(tmp_path / "d.npy", data)
    x, y = _all(convert(tmp_path / "d.npy", tmp_path / "out", target="1"))
    np.testing.assert_array_equal(x.numpy(), data[:, [0, 2, 3]])
    np.testing.assert_array_equal(y.numpy(), data[:, 1])


def test_convert_npy_target_out_of_range_refused(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((5, 3)))
    with pytest.raises(BatchfitError, match=r"`target` must be a column index .* \[-3, 3\)"):
        convert(tmp_path / "d.npy", tmp_path / "out", target=3)


def test_convert_npz_named(tmp_path, small_chunks):
    x, y = np.random.default_rng(0).random((50, 2, 3)), np.arange(50)
    np.savez_compressed(tmp_path / "d.npz", image=x, label=y)
    src = convert(tmp_path / "d.npz", tmp_path / "out")
    batch = _all(src)
    assert src.names == ("image", "label")
    np.testing.assert_array_equal(batch["image"].numpy(), x)
    np.testing.assert_array_equal(batch["label"].numpy(), y)


def test_convert_npz_target_gives_tuple_with_target_last(tmp_path):
    np.savez(tmp_path / "d.npz", y=np.arange(10), x=np.ones((10, 2)))
    src = convert(tmp_path / "d.npz", tmp_path / "out", target="y")
    x, y = _all(src)
    assert src.names is None and x.shape == (10, 2) and y.tolist() == list(range(10))


def test_convert_npz_unequal_lengths_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((10, 2)), y=np.arange(9))
    with pytest.raises(BatchfitError, match="same number of samples"):
        convert(tmp_path / "d.npz", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_csv_header_and_named_target(tmp_path, small_chunks):
    rows = ["a,label,b"] + [f"{i * 0.5},{i % 3},{-i}" for i in range(40)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    x, y = _all(convert(tmp_path / "d.csv", tmp_path / "out", target="label"))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    np.testing.assert_allclose(x.numpy(), [[i * 0.5, -i] for i in range(40)])
    assert y.tolist() == [i % 3 for i in range(40)]


def test_convert_csv_no_header_defaults_to_last_column(tmp_path):
    (tmp_path / "d.csv").write_text("1,2,0.5\n3,4,1.5\n\n5,6,2.25\n")
    x, y = _all(convert(tmp_path / "d.csv", tmp_path / "out"))
    assert x.tolist() == [[1, 2], [3, 4], [5, 6]] and y.dtype == torch.float32
    assert y.tolist() == [0.5, 1.5, 2.25]


def test_convert_tsv(tmp_path):
    (tmp_path / "d.tsv").write_text("x\ty\n1\t0\n2\t1\n")
    x, y = _all(convert(tmp_path / "d.tsv", tmp_path / "out", target="y"))
    assert x.tolist() == [[1.0], [2.0]] and y.tolist() == [0, 1]


def test_convert_csv_non_number_names_file_and_lines(tmp_path, small_chunks):
    rows = ["a,y"] + [f"{i},{i % 2}" for i in range(10)] + ["oops,1"]
    (tmp_path / "d.csv").write_text("\n".join(rows))
    with pytest.raises(BatchfitError, match=r"d\.csv, lines 9-12"):
        convert(tmp_path / "d.csv", tmp_path / "out", target="y")
    assert not (tmp_path / "out").exists()


def test_convert_csv_fractional_label_after_whole_ones_refused(tmp_path, small_chunks):
    rows = ["a,y"] + [f"{i},{i % 2}" for i in range(10)] + ["1,0.5"]
    (tmp_path / "d.csv").write_text("\n".join(rows))
    with pytest.raises(BatchfitError, match=r"line 12: the target column held whole numbers"):
        convert(tmp_path / "d.csv", tmp_path / "out", target="y")


def test_convert_csv_unknown_target_refused(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n1,2\n")
    with pytest.raises(BatchfitError, match=r"`target` must be one of \['a', 'b'\]"):
        convert(tmp_path / "d.csv", tmp_path / "out", target="c")


def _image_folder(tmp_path, sizes=((6, 5),) * 3, mode="RGB"):
    image_module = pytest.importorskip("PIL.Image")
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    expected = []
    for label, name in enumerate(["cat", "dog"]):
        (folder / name).mkdir(parents=True)
        for i, (height, width) in enumerate(sizes):
            shape = (height, width, 3) if mode == "RGB" else (height, width)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            image_module.fromarray(pixels, mode=mode).save(folder / name / f"{i}.png")
            expected.append((pixels, label))
    (folder / "dog" / "notes.txt").write_text("not an image")
    return folder, expected


def test_convert_image_folder(tmp_path):
    folder, expected = _image_folder(tmp_path)
    src = convert(folder, tmp_path / "out")
    images, labels = _all(src)
    assert images.dtype == torch.uint8 and images.shape == (6, 3, 6, 5)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(images[4].numpy(), expected[4][0].transpose(2, 0, 1))
    assert src.metadata["classes"] == ["cat", "dog"]


def test_convert_image_folder_grayscale_has_one_channel(tmp_path):
    folder, expected = _image_folder(tmp_path, mode="L")
    images, _ = _all(convert(folder, tmp_path / "out"))
    assert images.shape == (6, 1, 6, 5)
    np.testing.assert_array_equal(images[0, 0].numpy(), expected[0][0])


def test_convert_image_folder_resizes_to_image_size(tmp_path):
    folder, _ = _image_folder(tmp_path, sizes=((6, 5), (9, 4), (3, 3)))
    images, _ = _all(convert(folder, tmp_path / "out", image_size=(4, 7)))
    assert images.shape == (6, 3, 4, 7)


def test_convert_image_folder_mixed_sizes_refused(tmp_path):
    folder, _ = _image_folder(tmp_path, sizes=((6, 5), (9, 4)))
    with pytest.raises(BatchfitError, match=r"1\.png.*6x5 like the first image.*9x4"):
        convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_image_folder_target_refused(tmp_path):
    folder, _ = _image_folder(tmp_path)
    with pytest.raises(BatchfitError, match="`target` must be None for an image folder"):
        convert(folder, tmp_path / "out", target="y")


def test_convert_unknown_input_refused(tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"")
    with pytest.raises(BatchfitError, match=r"`in_path` must be a \.npy, \.npz, \.csv"):
        convert(tmp_path / "d.parquet", tmp_path / "out")
    with pytest.raises(BatchfitError, match="an existing file or folder"):
        convert(tmp_path / "missing.npy", tmp_path / "out")


def test_convert_existing_output_needs_overwrite(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 2)))
    convert(tmp_path / "x.npy", tmp_path / "out")
    with pytest.raises(BatchfitError, match="overwrite=True"):
        convert(tmp_path / "x.npy", tmp_path / "out")
    assert len(convert(tmp_path / "x.npy", tmp_path / "out", overwrite=True)) == 4


def test_verify_path_summary(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((40, 2), dtype=np.float32))
    convert(tmp_path / "x.npy", tmp_path / "out", shard_size=16)
    summary = verify_path(tmp_path / "out")
    assert "40 samples in 3 shards" in summary and "checksums of all 3 files match" in summary


def test_verify_path_corrupt_names_file(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((40, 2), dtype=np.float32))
    convert(tmp_path / "x.npy", tmp_path / "out", shard_size=16)
    name = read_manifest(tmp_path / "out")["shards"][1]["files"]["0"]["name"]
    path = tmp_path / "out" / name
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(data)
    assert "sizes of all 3 files" in verify_path(tmp_path / "out", mode="open")
    with pytest.raises(ShardError, match=f"{name} is corrupt"):
        verify_path(tmp_path / "out")
