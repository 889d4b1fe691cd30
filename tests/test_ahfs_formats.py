"""What ML code does with ``ah://`` URLs, with the real libraries against a real ah-server:
pandas (Parquet and CSV), pyarrow datasets with a filter and a column subset, numpy, a
safetensors header and two tensors read by range, and universal-pathlib."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import upath
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from tests.conftest import HubProcess
from tests.test_ahfs import Account, requests_seen


@pytest.fixture
def account(sqlite_server: HubProcess, tmp_path: Path) -> Account:
    return Account(sqlite_server, tmp_path / "cache")


def options(account: Account) -> dict[str, str]:
    return {"hub": account.server.url, "api_key": account.key,
            "cache_dir": str(account.cache)}


def test_pandas_parquet_round_trip(account: Account) -> None:
    frame = pd.DataFrame({"a": range(1000), "b": [f"s{i}" for i in range(1000)]})
    url = f"ah://{account.root}/table.parquet"
    frame.to_parquet(url, storage_options=options(account))
    assert account.commits()[0].message == "Write table.parquet through ah://"
    back = pd.read_parquet(url, storage_options=options(account))
    pd.testing.assert_frame_equal(back, frame)
    only_b = pd.read_parquet(url, columns=["b"], storage_options=options(account))
    assert list(only_b.columns) == ["b"] and len(only_b) == 1000


def test_pandas_csv(account: Account) -> None:
    url = f"ah://{account.root}/data/rows.csv"
    pd.DataFrame({"x": [1, 2, 3], "y": ["a", "b", "c"]}).to_csv(
        url, index=False, storage_options=options(account))
    back = pd.read_csv(url, storage_options=options(account))
    assert back.to_dict("list") == {"x": [1, 2, 3], "y": ["a", "b", "c"]}


def test_pyarrow_dataset_with_a_filter_and_columns(account: Account) -> None:
    fs = account.fs
    for part in range(3):
        table = pa.table({"value": list(range(100 * part, 100 * part + 100)),
                          "other": [0.5] * 100})
        with fs.open(f"{account.root}/ds/part={part}/data.parquet", "wb") as f:
            pq.write_table(table, f)
    dataset = ds.dataset(f"{account.root}/ds", filesystem=fs, format="parquet",
                         partitioning="hive")
    result = dataset.to_table(columns=["value"], filter=ds.field("part") == 1)
    assert result.column_names == ["value"] and result.num_rows == 100
    assert result.column("value").to_pylist() == list(range(100, 200))


def test_a_partitioned_dataset_written_by_pyarrow_keeps_every_partition(
        account: Account) -> None:
    """``pq.write_to_dataset`` writes its partitions' files from several threads at once,
    each named alike in its own directory. It kept only one partition's (the report: 100 of
    300 rows back, the commit message naming all three files): the other writes joined one
    write's commit after that commit had taken its files."""
    fs = account.fs
    table = pa.table({"k": [i % 3 for i in range(300)], "v": list(range(300))})
    pq.write_to_dataset(table, f"{account.root}/parts", partition_cols=["k"], filesystem=fs)
    written = fs.find(f"{account.root}/parts")
    assert sorted(p.split("/")[-2] for p in written) == ["k=0", "k=1", "k=2"]
    back = ds.dataset(f"{account.root}/parts", filesystem=fs, format="parquet",
                      partitioning="hive").to_table()
    assert sorted(back.column("v").to_pylist()) == list(range(300))


def test_numpy_load_of_an_npy(account: Account) -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    url = f"ah://{account.root}/w.npy"
    with fsspec.open(url, "wb", **options(account)) as f:
        np.save(f, array)
    with fsspec.open(url, "rb", **options(account)) as f:
        np.testing.assert_array_equal(np.load(f), array)


def test_safetensors_header_and_selected_tensors_by_range(account: Account) -> None:
    tensors = {f"layer{i}": np.full((256, 256), i, dtype=np.float32) for i in range(8)}
    path = f"{account.root}/model.safetensors"
    account.fs.pipe(path, save_safetensors(tensors))
    fs = account.filesystem()
    before = requests_seen(account.server)
    (length_bytes,) = fs.cat_ranges([path], [0], [8])
    (header_length,) = struct.unpack("<Q", length_bytes)
    header = json.loads(fs.cat_file(path, 8, 8 + header_length))
    wanted = ["layer2", "layer6"]
    base = 8 + header_length
    spans = [header[name]["data_offsets"] for name in wanted]
    chunks = fs.cat_ranges([path] * 2, [base + s for s, _ in spans], [base + e for _, e in spans])
    for name, chunk in zip(wanted, chunks, strict=True):
        got = np.frombuffer(chunk, dtype=np.float32).reshape(header[name]["shape"])
        np.testing.assert_array_equal(got, tensors[name])
    seen = requests_seen(account.server) - before
    file_size = fs.size(path)
    assert seen["file"] <= 4  # the header's block and the two tensors' blocks
    assert fs._runtime().cache.stats.bytes_fetched < file_size  # not the whole file
    whole = load_safetensors(fs.cat_file(path))
    np.testing.assert_array_equal(whole["layer7"], tensors["layer7"])


def test_universal_pathlib(account: Account) -> None:
    from ahmount.ahfs.upath import AhPath

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "filesystem not explicitly implemented" is one
        root = upath.UPath(f"ah://{account.root}", **options(account))
    assert isinstance(root, AhPath)
    (root / "notes").mkdir(parents=True, exist_ok=True)
    (root / "notes" / "a.txt").write_text("hello")
    assert (root / "notes" / "a.txt").read_text() == "hello"
    assert (root / "notes" / "a.txt").exists() and (root / "notes").is_dir()
    assert [p.name for p in (root / "notes").iterdir()] == ["a.txt"]
    assert sorted(p.name for p in root.glob("**/*.txt")) == ["a.txt"]
    assert (root / "notes" / "a.txt").stat().st_size == 5
