"""Hostile or broken shard folders: links that leave the folder, files named twice, files cut
while mapped, corrupt or hand-edited manifests and .npy headers. Each is a ShardError naming
the file and the field, never a raw error, a crash or wrong data; fuzzed manifests and headers
too."""

from __future__ import annotations

import copy
import json
import os
import random
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchfit.data.shards import MANIFEST, ShardSource, read_manifest, write_shards
from batchfit.data.shards.format import _hash_file
from batchfit.errors import ShardError

VERIFY = ("none", "open", "full")


def _write(path: Path, named: bool = False, shard_size: int = 5) -> Path:
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    y = np.arange(10, dtype=np.int64)
    if named:
        tokens = [np.arange(i % 4, dtype=np.int64) + 1 for i in range(10)]
        write_shards(path, {"x": x, "tokens": tokens, "y": y}, shard_size=shard_size, pad_value=-1)
    else:
        write_shards(path, (x, y), shard_size=shard_size)
    return path


def _edit(folder: Path, change) -> None:
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _file(folder: Path, shard: int = 0, key: str = "0") -> Path:
    return folder / read_manifest(folder)["shards"][shard]["files"][key]["name"]


def _open_and_read(folder: Path, verify: str) -> ShardSource:
    source = ShardSource(folder, verify=verify)
    source.gather(np.arange(len(source)))
    source.check_sizes()
    return source


def _replace_file(folder: Path, path: Path, data: bytes) -> None:
    """Write ``data`` as ``path`` and make the manifest agree (size and checksum), as a careful
    hand edit would: then even ``verify="full"`` passes and only the .npy header can tell."""
    path.write_bytes(data)

    def agree(manifest: dict[str, Any]) -> None:
        for shard in manifest["shards"]:
            for entry in shard["files"].values():
                if entry["name"] == path.name:
                    entry["bytes"], entry["blake2b"] = len(data), _hash_file(path)

    _edit(folder, agree)


def _npy(header: str, data: bytes) -> bytes:
    """An .npy file (version 1.0) with the header dict written as given, however wrong."""
    text = header.encode("latin1")
    pad = -(10 + len(text) + 1) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + data


def _data_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        return f.read()


# --- links and names ------------------------------------------------------------------------


@pytest.mark.parametrize("verify", VERIFY)
def test_shard_source_symlink_leaving_the_folder_refused(tmp_path, verify):
    folder = _write(tmp_path / "s")
    path = _file(folder, shard=1)
    outside = tmp_path / "elsewhere.npy"
    path.rename(outside)
    path.symlink_to(outside)
    with pytest.raises(ShardError, match=rf"Shard file {re.escape(str(path))} is a symbolic link to .*elsewhere.npy, "
                                         "outside the shard folder"):
        _open_and_read(folder, verify)


def test_shard_source_symlink_inside_the_folder_served(tmp_path):
    folder = _write(tmp_path / "s")
    path = _file(folder, shard=1)
    (folder / "sub").mkdir()
    path.rename(folder / "sub" / path.name)
    path.symlink_to(Path("sub") / path.name)
    source = _open_and_read(folder, "full")
    assert source.gather(np.arange(10))[0][5:].flatten().tolist() == list(range(15, 30))


@pytest.mark.parametrize("verify", VERIFY)
def test_shard_source_two_entries_naming_one_file_refused(tmp_path, verify):
    folder = _write(tmp_path / "s")
    # Shard 1 claims shard 0's file, size and checksum: "full" would pass and serve shard 0's rows twice.
    _edit(folder, lambda m: m["shards"][1]["files"]["0"].update(m["shards"][0]["files"]["0"]))
    with pytest.raises(ShardError, match=r"manifest.json is malformed: `shards\[1\]\.files\['0'\]\.name` must be a "
                                         r"file no other entry names \(`shards\[0\]\.files\['0'\]\.name` names it\)"):
        _open_and_read(folder, verify)


@pytest.mark.parametrize("verify", ["open", "full"])
def test_shard_source_entry_linked_to_another_entry_refused(tmp_path, verify):
    folder = _write(tmp_path / "s")
    first, second = _file(folder, shard=0), _file(folder, shard=1)
    _replace_file(folder, second, first.read_bytes())  # same content, then the same file under another name
    second.unlink()
    second.symlink_to(first.name)
    with pytest.raises(ShardError, match=f"Shard file {re.escape(str(second))} is the same file as .*{first.name}"):
        _open_and_read(folder, verify)


# --- files cut while mapped -----------------------------------------------------------------


def test_shard_source_check_sizes_names_a_file_truncated_after_it_was_mapped(tmp_path):
    folder = _write(tmp_path / "s")
    source = _open_and_read(folder, "open")
    path = _file(folder, shard=1, key="1")
    size = path.stat().st_size
    os.truncate(path, size - 8)  # reading the lost page now would kill the process (SIGBUS)
    with pytest.raises(ShardError, match=rf"Shard file {re.escape(str(path))} has {size - 8} bytes, but it was "
                                         rf"mapped with {size} .*truncated or rewritten while open"):
        source.check_sizes()
    source.close()  # mapped again, the file is checked against the manifest
    with pytest.raises(ShardError, match=f"{path.name} has {size - 8} bytes, but the manifest says {size}"):
        source.gather(np.arange(10))


def test_shard_source_check_sizes_passes_on_intact_and_replaced_files(tmp_path):
    folder = _write(tmp_path / "s")
    source = _open_and_read(folder, "open")
    path = _file(folder, shard=0)
    path.rename(tmp_path / "old.npy")  # replaced by rename: the map keeps the old file, which is whole
    path.write_bytes(b"")
    source.check_sizes()
    assert source.gather(np.arange(2))[0].flatten().tolist() == list(range(6))


@pytest.mark.skipif(sys.platform != "linux", reason="SIGBUS on a truncated map is Linux behaviour")
def test_shard_source_truncated_map_is_sigbus_unless_check_sizes_runs_first(tmp_path):
    """The documented limit: after check_sizes() the process can stop cleanly; reading kills it."""
    folder = _write(tmp_path / "s")
    code = textwrap.dedent(f"""
        import os, numpy as np
        from batchfit import ShardError, ShardSource
        source = ShardSource({str(folder)!r})
        source.gather(np.arange(10))
        path = {str(_file(folder, shard=1))!r}
        os.truncate(path, 0)  # its first page is gone: reading it is SIGBUS
        try:
            source.check_sizes()
        except ShardError as error:
            print("caught:", error, flush=True)
        source.gather(np.arange(10))
        print("not reached", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "caught: Shard file" in done.stdout and "not reached" not in done.stdout
    assert done.returncode == -7  # SIGBUS


# --- manifests --------------------------------------------------------------------------------


def _set(*where, value):
    def change(manifest):
        node = manifest
        for key in where[:-1]:
            node = node[key]
        node[where[-1]] = value
    return change


MANIFEST_CASES = {
    "missing pad_value": (lambda m: m.pop("pad_value"), r"`pad_value` is missing \(expected a number\)"),
    "samples 10**30": (_set("shards", 0, "samples", value=10**30),
                       r"`shards\[0\]\.samples` must be an integer from 1 to 2\*\*63 - 1. Received: 1000000000000"),
    "samples as a string": (_set("shards", 0, "samples", value="10"), r"`shards\[0\]\.samples` must be an integer"),
    "bytes as a string": (_set("shards", 0, "files", "0", "bytes", value="248"),
                          r"`shards\[0\]\.files\['0'\]\.bytes` must be an integer from 0 .* Received: '248'"),
    "negative shape": (_set("arrays", 0, "shape", value=[-3]), r"`arrays\[0\]\.shape\[0\]` must be an integer from 0"),
    "shape as a string": (_set("arrays", 0, "shape", value="3"), r"`arrays\[0\]\.shape` must be a list of at most"),
    "object dtype": (_set("arrays", 0, "dtype", value="|O"),
                     r"`arrays\[0\]\.dtype` must be a numeric NumPy dtype .* Received: '\|O'"),
    "big-endian dtype": (_set("arrays", 0, "dtype", value=">f4"),
                         r"`arrays\[0\]\.dtype` must be a numeric NumPy dtype in this machine's byte order"),
    "empty file name": (_set("shards", 0, "files", "0", "name", value=""),
                        r"`shards\[0\]\.files\['0'\]\.name` must be the name of a file in the shard folder"),
    "file name leaving the folder": (_set("shards", 0, "files", "0", "name", value="../x.npy"),
                                     r"`shards\[0\]\.files\['0'\]\.name` must be the name of a file"),
    "file named manifest.json": (_set("shards", 0, "files", "0", "name", value=MANIFEST),
                                 r"`shards\[0\]\.files\['0'\]\.name` must be .* not 'manifest.json'"),
    "version true": (_set("version", value=True), r"has format version True; this batchfit reads version 1"),
    "num_samples off by one": (_set("num_samples", value=11),
                               r"`num_samples` must be the sum of the shards' `samples` \(10\). Received: 11"),
    "names not the keys": (_set("names", value=["a", "b"]), r"`names` must be null \(a tuple source\) or the arrays'"),
    "ragged as a string": (_set("arrays", 1, "ragged", value="no"), r"`arrays\[1\]\.ragged` must be true or false"),
    "checksum not hex": (_set("shards", 1, "files", "1", "blake2b", value="xyz"),
                         r"`shards\[1\]\.files\['1'\]\.blake2b` must be 128 lowercase hex digits"),
    "a file entry missing": (lambda m: m["shards"][1]["files"].pop("1"),
                             r"`shards\[1\]\.files` must be an object with one entry per stored file, \['0', '1'\]"),
    "bytes too small for the samples": (_set("shards", 0, "files", "0", "bytes", value=30),
                                        r"`shards\[0\]\.files\['0'\]\.bytes` must be at least 60 for 5 samples"),
    "no shards": (_set("shards", value=[]), r"`shards` must be a non-empty list. Received: \[\]"),
    "shards as an object": (_set("shards", value={}), r"`shards` must be a non-empty list"),
    "metadata as a list": (_set("metadata", value=[]), r"`metadata` must be an object"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
@pytest.mark.parametrize("verify", ["open", "full"])
def test_shard_source_corrupt_manifest_names_the_manifest_and_the_field(tmp_path, case, verify):
    folder = _write(tmp_path / "s")
    change, message = MANIFEST_CASES[case]
    _edit(folder, change)
    with pytest.raises(ShardError, match=rf"Shard manifest {re.escape(str(folder / MANIFEST))} .*{message}"):
        _open_and_read(folder, verify)


def test_shard_source_manifest_with_a_key_twice_refused(tmp_path):
    folder = _write(tmp_path / "s")
    path = folder / MANIFEST
    path.write_text(path.read_text().replace('"num_samples": 10,', '"num_samples": 10, "num_samples": 10,', 1))
    with pytest.raises(ShardError, match=r"manifest.json cannot be read as JSON: the key 'num_samples' appears twice"):
        ShardSource(folder)


@pytest.mark.parametrize("pad_value", [1e30, float("nan"), 300])
def test_shard_source_pad_value_that_does_not_fit_the_ragged_dtype_refused(tmp_path, pad_value):
    folder = _write(tmp_path / "s", named=True)
    _edit(folder, lambda m: (m.__setitem__("pad_value", pad_value), m["arrays"][1].__setitem__("dtype", "|i1")))
    with pytest.raises(ShardError, match=r"`pad_value` must be a number that fits dtype int8 \(it pads array 'tok"):
        ShardSource(folder, verify="none")


# --- .npy headers ---------------------------------------------------------------------------


@pytest.mark.parametrize("verify", VERIFY)
def test_shard_source_header_shape_larger_than_the_file_refused(tmp_path, verify):
    folder = _write(tmp_path / "s")
    path = _file(folder, shard=0)
    # The header says 9 rows, the file holds 5; the manifest agrees with the header (and the checksum).
    _replace_file(folder, path, _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (9, 3), }", _data_bytes(path)))
    _edit(folder, lambda m: (m["shards"][0].__setitem__("samples", 9), m.__setitem__("num_samples", 14)))
    with pytest.raises(ShardError, match=rf"Shard file {re.escape(str(path))} holds 60 bytes after its .npy header, "
                                         r"but the header's `shape` \(9, 3\) of float32 needs 108"):
        _open_and_read(folder, verify)


def test_shard_source_fortran_order_header_named(tmp_path):
    folder = _write(tmp_path / "s")
    path = _file(folder, shard=0)
    _replace_file(folder, path, _npy("{'descr': '<f4', 'fortran_order': True, 'shape': (5, 3), }", _data_bytes(path)))
    with pytest.raises(ShardError, match=rf"Shard file {re.escape(str(path))} is in Fortran order "
                                         r"\(`fortran_order` True in its .npy header\); shard files are in C order"):
        _open_and_read(folder, "full")


@pytest.mark.parametrize(("descr", "shown"), [(">f4", ">f4"), ("|O", "object"), ("<i4", "int32")])
def test_shard_source_header_dtype_differing_from_the_manifest_named(tmp_path, descr, shown):
    folder = _write(tmp_path / "s")
    path = _file(folder, shard=0)
    _replace_file(folder, path, _npy(f"{{'descr': '{descr}', 'fortran_order': False, 'shape': (5, 3), }}",
                                     _data_bytes(path)))
    with pytest.raises(ShardError, match=rf"Shard file {re.escape(str(path))} holds dtype {re.escape(shown)} "
                                         rf"\(`descr` '{re.escape(descr)}' in its .npy header\); the manifest says "
                                         r"dtype float32 \('<f4'\)"):
        _open_and_read(folder, "full")


def test_shard_source_big_endian_folder_refused_at_the_manifest(tmp_path):
    folder = _write(tmp_path / "s")
    for shard in (0, 1):  # every file and the manifest agree on big-endian data
        path = _file(folder, shard=shard)
        _replace_file(folder, path, _npy("{'descr': '>f4', 'fortran_order': False, 'shape': (5, 3), }",
                                         np.frombuffer(_data_bytes(path), "<f4").astype(">f4").tobytes()))
    _edit(folder, _set("arrays", 0, "dtype", value=">f4"))
    with pytest.raises(ShardError, match=r"manifest.json is malformed: `arrays\[0\]\.dtype` must be a numeric NumPy "
                                         r"dtype in this machine's byte order"):
        _open_and_read(folder, "full")


def test_shard_source_header_that_is_not_npy_named(tmp_path):
    folder = _write(tmp_path / "s")
    path = _file(folder, shard=1)
    _replace_file(folder, path, b"not an npy file at all" + bytes(200))
    with pytest.raises(ShardError, match=rf"Shard file {re.escape(str(path))} has no valid .npy header"):
        _open_and_read(folder, "full")


@pytest.mark.parametrize("verify", VERIFY)
def test_shard_source_directory_in_place_of_a_file_named(tmp_path, verify):
    folder = _write(tmp_path / "s")
    path = _file(folder, shard=1)
    path.unlink()
    path.mkdir()
    _edit(folder, _set("shards", 1, "files", "0", "bytes", value=path.stat().st_size))
    with pytest.raises(ShardError, match=rf"Shard file {re.escape(str(path))} is not a regular file \(a directory\)"):
        _open_and_read(folder, verify)


# --- fuzz -----------------------------------------------------------------------------------

_ODD_VALUES: list[Any] = [None, True, False, "", "10", "x", 3.5, -1, 0, 1, 2**63, 10**30, [], {}, [1], {"a": 1},
                          float("nan"), float("inf"), "<f4", "|O", ">f4", "<f16", "../x.npy", ".hidden", MANIFEST]


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON tree, as the keys leading to it."""
    found = [prefix] if prefix else []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        found.extend(_paths(child, (*prefix, key)))
    return found


def _mutate(manifest: dict[str, Any], rng: random.Random, names: list[str]) -> None:
    """One random damage: a field deleted, its type swapped, a number out of range, a name reused."""
    where = rng.choice(_paths(manifest))
    parent = manifest
    for key in where[:-1]:
        parent = parent[key]
    key, value = where[-1], parent[where[-1]]
    kind = rng.choice(["delete", "swap", "number", "name"])
    if kind == "delete":
        del parent[key]
    elif kind == "number" and isinstance(value, int) and not isinstance(value, bool):
        parent[key] = rng.choice([-1, 0, value - 1, value + 1, value * 2, -value, 2**63 - 1, 2**63, 10**30])
    elif kind == "name" and isinstance(value, str):
        parent[key] = rng.choice(names + [value.upper(), value + "x", value[:-1]])
    else:
        parent[key] = copy.deepcopy(rng.choice(_ODD_VALUES))


def _classify(folder: Path, verify: str) -> str:
    """``"refused"`` (a ShardError naming a file of the folder), ``"opened"``, or a failure."""
    try:
        source = _open_and_read(folder, verify)
        source.close()
        return "opened"
    except ShardError as error:
        if not re.search(re.escape(str(folder)) + r"/\S", str(error)):
            pytest.fail(f"a ShardError that names no file of the folder: {error}")
        return "refused"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shard_manifest_fuzz_gives_a_named_shard_error_or_a_clean_open(tmp_path, seed):
    rng = random.Random(seed)
    folders = [_write(tmp_path / "tuple"), _write(tmp_path / "named", named=True)]
    originals = [(folder / MANIFEST).read_text() for folder in folders]
    counts = {"opened": 0, "refused": 0}
    started = time.monotonic()
    for case in range(120):
        which = rng.randrange(2)
        folder, manifest = folders[which], json.loads(originals[which])
        names = [e["name"] for s in manifest["shards"] for e in s["files"].values()]
        for _ in range(rng.randint(1, 3)):
            if isinstance(manifest, dict) and _paths(manifest):
                _mutate(manifest, rng, names)
        (folder / MANIFEST).write_text(json.dumps(manifest))
        try:
            counts[_classify(folder, rng.choice(VERIFY))] += 1
        except Exception as error:  # anything but a ShardError naming a file: the case is shown
            pytest.fail(f"case {case} (seed {seed}) raised {type(error).__name__}: {error}\n{json.dumps(manifest)}")
    print(f"manifest fuzz, seed {seed}: {counts}")
    assert counts["refused"] > counts["opened"]  # most damage is refused; harmless edits (a pad_value) open
    assert time.monotonic() - started < 30


_HEADER_FIELDS: dict[str, list[str]] = {
    "descr": ["'<f4'", "'>f4'", "'|O'", "'<i8'", "'<f8'", "'xyz'", "5", "None", "[('a', '<f4')]", "'(2,)<f4'"],
    "fortran_order": ["False", "True", "'yes'", "1", "None"],
    "shape": ["(5, 3)", "(9, 3)", "(4, 3)", "(5,)", "(15,)", "(5, 3, 1)", "(-5, 3)", "(5, -3)", "()", "('5', 3)",
              "(10**30, 3)", "[5, 3]", "None"],
}


@pytest.mark.parametrize("seed", [0, 1])
def test_shard_header_fuzz_gives_a_named_shard_error_or_a_clean_open(tmp_path, seed):
    rng = random.Random(seed)
    folder = _write(tmp_path / "s")
    path = _file(folder, shard=1)
    data, manifest = _data_bytes(path), (folder / MANIFEST).read_text()
    counts = {"opened": 0, "refused": 0}
    for case in range(60):
        (folder / MANIFEST).write_text(manifest)
        fields = {name: rng.choice(values) for name, values in _HEADER_FIELDS.items()}
        if rng.random() < 0.2:
            del fields[rng.choice(sorted(fields))]
        header = "{" + "".join(f"'{name}': {value}, " for name, value in fields.items()) + "}"
        body = data[: rng.choice([len(data), len(data) - 4, 0])] + bytes(rng.choice([0, 0, 4]))
        _replace_file(folder, path, _npy(header, body))
        try:
            counts[_classify(folder, rng.choice(VERIFY))] += 1
        except Exception as error:  # anything but a ShardError naming a file
            pytest.fail(f"case {case} (seed {seed}) header {header} raised {type(error).__name__}: {error}")
    print(f"header fuzz, seed {seed}: {counts}")
    assert counts["refused"] > counts["opened"]
