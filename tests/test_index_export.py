"""`index export`: Parquet and .npy round trips (the same ids, paths, metadata and vectors as the
index's rows), and a bounded memory when exporting a large synthetic index (peak RSS of the
exporting process, measured in a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from index.cli import main as index_main
from index.export import CHUNK_ROWS, export_index, npy_companions
from index.store import ImageIndex

REPO = Path(__file__).resolve().parent.parent


def _unit(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, np.ndarray, list[int], list[dict]]:
    vecs = _unit(300, 24, 0)
    records = [{"path": f"d{i % 4}/é {i}.jpg", "sha256": f"{i:064x}", "width": i, "height": 2 * i, "size": 10 * i,
                "mtime": 1.5 * i, "metadata": {"label": ["a", "b"][i % 2], "n": i, "ok": i % 3 == 0, "x": None}}
               for i in range(300)]
    with ImageIndex.create(tmp_path / "ix", 24) as ix:
        ids = ix.add(vecs, records)
        ix.remove(ids[:10])  # removed rows are not exported
        ix.commit()
    return tmp_path / "ix", vecs[10:], ids[10:], records[10:]


def test_parquet_round_trip(small: tuple[Path, np.ndarray, list[int], list[dict]], tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet", reason="the export extra: pip install 'simsearch[export]'")
    directory, vecs, ids, records = small
    summary = export_index(directory, tmp_path / "out.parquet")
    assert summary["rows"] == 290 and summary["dim"] == 24 and summary["files"] == [str(tmp_path / "out.parquet")]
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column_names == ["id", "path", "sha256", "width", "height", "size", "mtime", "added_at",
                                  "metadata", "vector"]
    assert table["id"].to_pylist() == ids
    got = table["vector"].combine_chunks().flatten().to_numpy().reshape(-1, 24)
    assert got.dtype == np.float32 and np.array_equal(got, vecs)  # bit for bit: the stored float32
    rows = table.to_pylist()
    for row, rec in zip(rows, records, strict=True):
        assert {k: row[k] for k in ("path", "sha256", "width", "height", "size", "mtime")} == \
            {k: rec[k] for k in ("path", "sha256", "width", "height", "size", "mtime")}
        assert json.loads(row["metadata"]) == rec["metadata"]
    # pandas reads it as it is (the vectors as arrays)
    pd = pytest.importorskip("pandas")
    frame = pd.read_parquet(tmp_path / "out.parquet")
    assert list(frame["id"]) == ids and np.array_equal(np.stack(frame["vector"].to_numpy()), vecs)


def test_npy_round_trip(small: tuple[Path, np.ndarray, list[int], list[dict]], tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    directory, vecs, ids, records = small
    out = tmp_path / "emb.npy"
    assert index_main(["export", "--index", str(directory), "--out", str(out), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    ids_path, jsonl_path = npy_companions(out)
    assert summary["files"] == [str(out), str(ids_path), str(jsonl_path)] and summary["rows"] == 290
    got = np.load(out, mmap_mode="r")  # a plain array: opens without being read
    assert got.dtype == np.float32 and got.shape == (290, 24) and np.array_equal(got, vecs)
    assert np.load(ids_path).tolist() == ids
    lines = [json.loads(line) for line in jsonl_path.read_text(encoding="utf-8").splitlines()]
    assert [x["id"] for x in lines] == ids and [x["path"] for x in lines] == [r["path"] for r in records]
    assert [x["metadata"] for x in lines] == [r["metadata"] for r in records]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind


def test_export_errors_are_one_line(small: tuple[Path, np.ndarray, list[int], list[dict]], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    directory, *_ = small
    assert index_main(["export", "--index", str(directory), "--out", str(tmp_path / "x.csv")]) == 2
    assert "one of ['.parquet', '.npy']" in capsys.readouterr().err
    assert index_main(["export", "--index", str(tmp_path / "none"), "--out", str(tmp_path / "x.npy")]) == 2
    assert index_main(["export", "--index", str(directory), "--out", str(tmp_path / "no" / "x.npy")]) == 2
    with ImageIndex.create(tmp_path / "empty", 8):
        pass
    assert export_index(tmp_path / "empty", tmp_path / "e.npy")["rows"] == 0
    assert np.load(tmp_path / "e.npy").shape == (0, 8)


N_LARGE, DIM_LARGE = 300_000, 64

_MEASURE = textwrap.dedent("""
    import sys
    import numpy, pyarrow, pyarrow.parquet  # imported before the measurement: their memory is not the export's
    from index.export import export_index

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])  # KiB

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current RSS: the import's peak is not counted
    before = status("VmRSS")
    export_index(sys.argv[1], sys.argv[2])
    print(before, status("VmHWM"))
""")


def _peak_growth_mib(*args: str) -> float:
    out = subprocess.run([sys.executable, "-c", _MEASURE, *args], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split()
    return (int(out[1]) - int(out[0])) / 1024


def _build(directory: Path, n: int) -> Path:
    with ImageIndex.create(directory, DIM_LARGE, index_mode="flat") as ix:
        for start in range(0, n, 50_000):
            m = min(50_000, n - start)
            ix.add(_unit(m, DIM_LARGE, start), [{"path": f"p/{i}.jpg", "metadata": {"i": i}}
                                                for i in range(start, start + m)])
        ix.commit()
    return directory


def test_export_memory_stays_bounded_on_a_large_index(tmp_path: Path) -> None:
    """The exporting process's peak RSS (Linux VmHWM, reset just before the export) for 300,000 x 64
    vectors (73 MiB of float32 plus records) against 30,000 x 64: ten times the rows, the same peak
    give or take a chunk. (pyarrow's Parquet writer alone costs a fixed ~75 MiB on its first write,
    whatever the size; a comparison of two sizes is what shows that memory does not follow the data.)"""
    pytest.importorskip("pyarrow", reason="the export extra: pip install 'simsearch[export]'")
    small, large = _build(tmp_path / "small", N_LARGE // 10), _build(tmp_path / "large", N_LARGE)
    data_mib = N_LARGE * DIM_LARGE * 4 / 2**20
    for ext in (".npy", ".parquet"):
        growth = {name: _peak_growth_mib(str(d), str(tmp_path / f"{name}{ext}"))
                  for name, d in (("small", small), ("large", large))}
        print(f"{ext}: peak RSS growth {growth['small']:.1f} MiB for 30,000 rows, {growth['large']:.1f} MiB for "
              f"300,000 rows ({data_mib:.0f} MiB of vectors; chunks of {CHUNK_ROWS} rows)")
        assert growth["large"] - growth["small"] < data_mib / 8, (ext, growth)
        if ext == ".npy":
            assert growth["large"] < data_mib / 4, growth
    assert np.load(tmp_path / "large.npy", mmap_mode="r").shape == (N_LARGE, DIM_LARGE)
    import pyarrow.parquet as pq

    assert pq.ParquetFile(tmp_path / "large.parquet").metadata.num_rows == N_LARGE
