"""bf.images: image folders as encoded shards, per-sample deterministic transforms, ImageSource."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import torch

import batchfit as bf
from batchfit.data.convert import convert
from batchfit.errors import BatchfitError

Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 generated JPEGs a class, 3 classes, sides 40 to 90 pixels; plus a PNG and a grayscale JPEG."""
    root = bf.images.make_image_folder(tmp_path_factory.mktemp("images") / "train", 12, classes=3, sizes=(40, 90))
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(root / "circle" / "zz_png.png")
    Image.fromarray(rng.integers(0, 256, (60, 45), dtype=np.uint8)).save(root / "square" / "zz_gray.jpg")
    return root


@pytest.fixture(scope="module")
def encoded(folder, tmp_path_factory):
    return bf.images.write_image_shards(folder, tmp_path_factory.mktemp("shards") / "enc", workers=0, progress=False)


def files_in_label_order(folder):
    return [p for name in sorted(d.name for d in folder.iterdir()) for p in sorted((folder / name).iterdir())]


def test_encoded_shards_keep_the_files_bytes(folder, encoded):
    files = files_in_label_order(folder)
    data, lengths, labels = encoded.gather(np.arange(len(encoded)))
    assert len(encoded) == len(files) == 38
    for row, path in enumerate(files):
        assert data[row, : lengths[row]].numpy().tobytes() == path.read_bytes(), path


def test_encoded_shards_round_trip_to_pillows_pixels(folder, encoded):
    files = files_in_label_order(folder)
    indices = np.array([0, 12, 13, 25, 37, 5])  # JPEGs, the PNG and the grayscale JPEG, out of order
    decoded = bf.images.decode(encoded.gather(indices), mode="RGB")
    for row, index in enumerate(indices):
        expected = np.asarray(Image.open(files[index]).convert("RGB"))
        np.testing.assert_array_equal(decoded[row], expected)
    own_modes = bf.images.decode(encoded.gather(indices))  # each file in its own mode
    assert own_modes[3].shape == (60, 45, 1) and own_modes[4].shape[2] == 3
    np.testing.assert_array_equal(own_modes[3][:, :, 0], np.asarray(Image.open(files[25])))


def test_class_names_and_labels_survive(folder, encoded):
    reopened = bf.ShardSource(encoded.path)
    assert reopened.classes == ["circle", "square", "triangle"]
    _, _, labels = reopened.gather(np.arange(len(reopened)))
    assert labels.tolist() == [0] * 13 + [1] * 13 + [2] * 12
    source = bf.images.ImageSource(encoded.path, bf.images.eval_transform(16))
    assert source.classes == reopened.classes and source.metadata["images"]["encoded"] is True


def test_writer_processes_write_what_one_process_writes(folder, tmp_path, monkeypatch):
    from batchfit.data.images import folder as folder_module

    monkeypatch.setattr(folder_module, "FILES_PER_TASK", 5)  # several tasks for two processes
    parallel = bf.images.write_image_shards(folder, tmp_path / "parallel", workers=2, progress=False, shard_size=7)
    alone = bf.images.write_image_shards(folder, tmp_path / "alone", workers=0, progress=False)
    every = np.arange(len(alone))
    for a, b in zip(parallel.gather(every), alone.gather(every)):
        assert torch.equal(a, b)
    assert len(parallel.shard_sizes) == 6


def _with_corrupt(folder, tmp_path):
    """A copy of ``folder`` with a truncated JPEG and a file of garbage named .jpg."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    good = (copy / "triangle" / "00000.jpg").read_bytes()
    (copy / "triangle" / "00003.jpg").write_bytes(good[: len(good) // 2])
    (copy / "circle" / "00001.jpg").write_bytes(b"not a jpeg at all")
    return copy


def test_corrupt_images_are_named_and_nothing_is_written(folder, tmp_path):
    copy = _with_corrupt(folder, tmp_path)
    with pytest.raises(BatchfitError, match=r"circle/00001\.jpg cannot be read: UnidentifiedImageError"):
        bf.images.write_image_shards(copy, tmp_path / "out", workers=0, progress=False)
    assert not (tmp_path / "out").exists()


def test_corrupt_images_are_skipped_and_listed_when_asked(folder, tmp_path):
    copy = _with_corrupt(folder, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = bf.images.write_image_shards(copy, tmp_path / "out", on_corrupt="skip", workers=0, progress=False)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "circle/00001.jpg: UnidentifiedImageError" in messages[0]
    assert "triangle/00003.jpg: OSError: image file is truncated" in messages[1]
    assert len(out) == 36
    skipped = json.loads((tmp_path / "out" / "manifest.json").read_text())["metadata"]["images"]["skipped"]
    assert [s["file"].rsplit("/", 2)[-2:] for s in skipped] == [["circle", "00001.jpg"], ["triangle", "00003.jpg"]]


def test_max_side_reencodes_only_larger_images(folder, tmp_path):
    out = bf.images.write_image_shards(folder, tmp_path / "small", max_side=50, workers=0, progress=False)
    decoded = bf.images.decode(out.gather(np.arange(len(out))))
    originals = [Image.open(p).size for p in files_in_label_order(folder)]
    for pixels, (width, height) in zip(decoded, originals):
        assert max(pixels.shape[:2]) <= 50
        if max(width, height) <= 50:
            assert pixels.shape[:2] == (height, width)


def test_decoded_shards_remain_an_option(folder, tmp_path):
    out = convert(folder, tmp_path / "dec", image_size=24)
    images, labels = out.gather(np.arange(len(out)))
    assert images.shape == (38, 3, 24, 24) and images.dtype == torch.uint8 and out.classes[0] == "circle"
    transformed, same_labels = bf.images.ImageSource(out, bf.images.train_transform(16)).gather(np.arange(4))
    assert transformed.shape == (4, 3, 16, 16) and torch.equal(same_labels, labels[:4])


def test_cli_writes_encoded_shards_by_default(folder, tmp_path):
    from batchfit.cli import main

    assert main(["shards", "write", str(folder), str(tmp_path / "cli"), "--on-corrupt", "skip", "--workers", "0"]) == 0
    assert bf.ShardSource(tmp_path / "cli").metadata["images"]["encoded"] is True
    assert main(["shards", "write", str(folder), str(tmp_path / "cli_dec"), "--decode", "--image-size", "20"]) == 0
    assert bf.ShardSource(tmp_path / "cli_dec").specs[0].shape == (3, 20, 20)


# --- transforms ---------------------------------------------------------------------------------


def test_train_transform_is_a_function_of_seed_epoch_and_sample(encoded):
    source = bf.images.ImageSource(encoded, bf.images.train_transform(20))
    a, _ = source.gather(np.array([3, 9, 30]), seed=7, epoch=2)
    b, _ = source.gather(np.array([30, 1, 3]), seed=7, epoch=2)  # other batch, other positions
    assert torch.equal(a[0], b[2]) and torch.equal(a[2], b[0])
    c, _ = source.gather(np.array([3, 9, 30]), seed=7, epoch=3)
    d, _ = source.gather(np.array([3, 9, 30]), seed=8, epoch=2)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_train_transform_flips_half_the_images(encoded):
    transform = bf.images.train_transform(24, scale=(1.0, 1.0), ratio=(1.4, 1.4), mean=None, std=None)
    # the whole 70x50 PNG (index 12) under many seeds: only the flip differs
    outputs = [transform(encoded.gather(np.array([12])), seed=s, indices=[12])[0][0] for s in range(24)]
    plain = [o for o in outputs if torch.equal(o, outputs[0])]
    mirrored = [o for o in outputs if torch.equal(o, outputs[0].flip(-1))]
    assert len(plain) + len(mirrored) == 24 and 4 <= len(mirrored) <= 20


def test_random_resized_crop_follows_scale_and_ratio():
    from batchfit.data.images.transforms import random_resized_box

    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_box(300, 200, rng.random(23), (0.2, 0.5), (0.5, 2.0))
        width, height = right - left, bottom - top
        assert 0 <= left and right <= 300 and 0 <= top and bottom <= 200
        assert 0.19 <= width * height / 60000 <= 0.51 and 0.45 <= width / height <= 2.2


def test_eval_transform_draws_no_random_numbers_and_normalises(encoded):
    transform = bf.images.eval_transform(16)
    batch = encoded.gather(np.arange(6))
    torch.manual_seed(0)
    first, labels = transform(batch)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))  # the transform drew nothing from torch's generator
    second, _ = transform(batch, seed=5, epoch=9, indices=np.arange(6))
    assert torch.equal(first, second) and first.dtype == torch.float32 and first.shape == (6, 3, 16, 16)
    raw, _ = bf.images.eval_transform(16, mean=None, std=None)(batch)
    expected = (raw - torch.tensor(bf.images.IMAGENET_MEAN).reshape(1, 3, 1, 1)) / torch.tensor(
        bf.images.IMAGENET_STD).reshape(1, 3, 1, 1)
    torch.testing.assert_close(first, expected)
    assert 0 <= float(raw.min()) and float(raw.max()) <= 1


def test_eval_transform_without_draft_is_pillows_resize_of_the_centre_box(folder, encoded):
    transform = bf.images.eval_transform(16, resize=20, mean=None, std=None, draft=False)
    out, _ = transform(encoded.gather(np.array([2])))
    image = Image.open(files_in_label_order(folder)[2]).convert("RGB")
    side = 16 * min(image.size) / 20
    left, top = (image.width - side) / 2, (image.height - side) / 2
    expected = np.asarray(image.resize((16, 16), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)))
    np.testing.assert_array_equal((out[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), expected)


def test_draft_decoding_stays_close_to_full_decoding(encoded):
    batch = encoded.gather(np.arange(10))
    fast, _ = bf.images.train_transform(16, mean=None, std=None)(batch, seed=1, indices=np.arange(10))
    full, _ = bf.images.train_transform(16, mean=None, std=None, draft=False)(batch, seed=1, indices=np.arange(10))
    assert float((fast - full).abs().mean()) < 0.05


def test_grayscale_folders_give_one_channel(tmp_path):
    root = tmp_path / "gray"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((30, 20 + i), 40 * i, dtype=np.uint8)).save(root / name / f"{i}.png")
    source = bf.images.ImageSource(bf.images.write_image_shards(root, tmp_path / "out", workers=0, progress=False),
                                   bf.images.train_transform(8, mean=[0.5], std=[0.25]))
    images, _ = source.gather(np.arange(6))
    assert images.shape == (6, 1, 8, 8)


# --- through the Batcher -----------------------------------------------------------------------


def _epoch(source, **options):
    batcher = bf.Batcher(source, batch_size=8, shuffle=True, seed=3, **options)
    batcher.set_epoch(1)
    return [batch for batch in batcher.remaining()]


def test_batches_from_workers_equal_batches_in_process(encoded):
    source = bf.images.ImageSource(encoded, bf.images.train_transform(16))
    alone = _epoch(source)
    for options in ({"workers": 2}, {"prefetch": 2}):
        other = _epoch(source, **options)
        assert len(other) == len(alone) == 5
        for (x, y), (x2, y2) in zip(alone, other):
            assert torch.equal(x, x2) and torch.equal(y, y2)


def test_epochs_differ_and_resume_mid_epoch_gives_the_same_batches(encoded):
    source = bf.images.ImageSource(encoded, bf.images.train_transform(16))
    batcher = bf.Batcher(source, batch_size=8, shuffle=True, seed=3)
    first = [x for x, _ in batcher.remaining()]
    batcher.set_epoch(1)
    batcher.load_state_dict({**batcher.state_dict(), "epoch": 0, "samples_done": 16})
    again = [x for x, _ in batcher.remaining()]
    assert all(torch.equal(a, b) for a, b in zip(first[2:], again))
    batcher.set_epoch(1)
    second = [x for x, _ in batcher.remaining()]
    assert not torch.equal(first[0], second[0])


def test_trainer_learns_from_an_image_source(encoded):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 3))
    trainer = bf.Trainer(model, torch.nn.functional.cross_entropy, torch.optim.Adam(model.parameters(), lr=0.01),
                         batch_size=8, progress=False)
    train = bf.images.ImageSource(encoded, bf.images.train_transform(16))
    history = trainer.fit(train, epochs=1, val=bf.images.ImageSource(encoded, bf.images.eval_transform(16)))
    assert np.isfinite(history.epochs[-1]["val_loss"])


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("call", "match"), [
    (lambda: bf.images.train_transform(0), "`size` must be a positive integer"),
    (lambda: bf.images.train_transform(8, scale=(0.5, 0.1)), "`scale` must be a pair"),
    (lambda: bf.images.train_transform(8, scale=(0.5, 2.0)), "`scale` must be area fractions of at most 1"),
    (lambda: bf.images.eval_transform(8, resize=4), "`resize` must be an integer of at least size=8"),
    (lambda: bf.images.train_transform(8, mean=[0.5]), r"`std` must be 1 values, one per value of mean"),
    (lambda: bf.images.train_transform(8, mean=[0.5], std=None), "`std` must be given together with mean"),
])
def test_transform_arguments_are_checked(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_image_source_refuses_other_shards_and_batches(tmp_path, encoded):
    plain = bf.write_shards(tmp_path / "plain", (np.zeros((4, 3), np.float32),))
    with pytest.raises(ValueError, match="`src` must be a shard folder of images and labels"):
        bf.images.ImageSource(plain, bf.images.eval_transform(8))
    with pytest.raises(ValueError, match="`batch` must be encoded images"):
        bf.images.eval_transform(8)((torch.zeros(2, 3), torch.zeros(2)))
    with pytest.raises(ValueError, match="`on_corrupt` must be one of"):
        bf.images.write_image_shards(tmp_path, tmp_path / "x", on_corrupt="ignore")


def test_write_image_shards_refuses_a_folder_without_images(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "notes.txt").write_text("no image")
    with pytest.raises(ValueError, match="`folder` must be image files in its class sub-folders"):
        bf.images.write_image_shards(tmp_path / "empty", tmp_path / "out", progress=False)


def test_generated_folders_are_real_jpegs_of_varied_sizes(tmp_path):
    root = bf.images.make_image_folder(tmp_path / "gen", 3, classes=2, sizes=(30, 60), seed=4)
    sizes = set()
    for path in sorted(root.rglob("*.jpg")):
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            assert image.format == "JPEG"
            sizes.add(image.size)
    assert len(sizes) > 3
    again = bf.images.make_image_folder(tmp_path / "gen2", 3, classes=2, sizes=(30, 60), seed=4)
    assert (again / "circle" / "00001.jpg").read_bytes() == (root / "circle" / "00001.jpg").read_bytes()


def test_image_source_reads_files_whole_as_the_padded_gather_would_give_them(folder, encoded, tmp_path):
    transform = bf.images.train_transform(12)
    indices = np.array([37, 0, 12, 25, 3])
    padded = transform(encoded.gather(indices), seed=2, epoch=1, indices=indices, mode="RGB")
    many = bf.images.write_image_shards(folder, tmp_path / "many", workers=0, progress=False, shard_size=5)
    for source in (encoded, many):  # one shard, and eight
        read, labels = bf.images.ImageSource(source, transform).gather(indices, seed=2, epoch=1)
        assert torch.equal(read, padded[0]) and torch.equal(labels, padded[1])


def test_a_config_trains_on_image_shards(encoded, tmp_path):
    from batchfit.config import load_config
    from batchfit.run import run_config

    config = tmp_path / "images.toml"
    config.write_text(f"""
[data]
train = "{encoded.path}"
val = "{encoded.path}"
image_size = 16
[model]
name = "resnet"
args = {{ widths = [8, 16] }}
[optimizer]
name = "adam"
lr = 0.01
[train]
epochs = 1
batch_size = 16
progress = false
out = "{tmp_path / 'runs'}"
""")
    summary = run_config(load_config(config))
    assert summary is not None and summary["steps"] == 3 and 0 <= summary["val_accuracy"] <= 1
    missing = tmp_path / "no_size.toml"
    missing.write_text(config.read_text().replace("image_size = 16\n", ""))
    with pytest.raises(ValueError, match="`data.image_size` is required"):
        run_config(load_config(missing))


def test_ranks_together_see_the_single_process_batch(encoded):
    source = bf.images.ImageSource(encoded, bf.images.train_transform(12))
    whole = next(iter(bf.Batcher(source, batch_size=10, shuffle=True, seed=4)))
    shares = [next(iter(bf.Batcher(source, batch_size=10, shuffle=True, seed=4, rank=r, world_size=2)))
              for r in range(2)]
    assert torch.equal(torch.cat([x for x, _ in shares]), whole[0])
    assert torch.equal(torch.cat([y for _, y in shares]), whole[1])
