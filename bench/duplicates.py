"""Bench: precision and recall of duplicate pairs by cosine threshold, and the defaults it picks.

    .venv/bin/python bench/duplicates.py                       # the shipped test model, 200 originals a class
    .venv/bin/python bench/duplicates.py --model MODEL_DIR --per-class 100

Originals: CIFAR-10 test images (from ../shared/data/cifar10-jpeg.tar.gz, extracted once to
--scratch), `--per-class` a class after skipping the first `--skip` (the ones shipped in
tests/data, on which the tests check the defaults). Each original gets the copies of
tests/near_copies.py (half size, JPEG q40, 10% crop, mirror, PNG). The folder is indexed with
`simsearch index build` (the real decoding and model); every tenth original is then added once
more with the same bytes, as the server's POST /v1/items would (a folder build indexes a file's
bytes once and lists further copies in its summary instead). Then:

- pairs: every pair of items (brute force over the stored vectors, blockwise) is a positive when
  both come from one original; precision and recall of "cosine >= t" at each t of the sweep
  (pairs with the same bytes count as found at every t: the index knows them by sha256);
- the defaults: `duplicate` = the lowest t with pair precision >= 0.95, `similar` = the highest t
  with pair recall >= 0.99;
- groups at each default, with index/duplicates.py itself (range search + keeper grouping): share
  of copies in their original's group, groups holding two or more originals, exact copies found.

The model matters: thresholds are cosines of one model's vectors. The default model is
tests/data/models/cifar10-smallcnn2 (the demo's CPU preset trained on CIFAR-10's training images;
tests/data/models/README.md). CIFAR-10's test set has a few near-identical pictures of its own, so
some "false" pairs are real near-duplicates.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from index.duplicates import find_duplicates  # noqa: E402
from index.export import export_index  # noqa: E402
from index.near_copies import TRANSFORMS  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
MODEL = REPO / "tests" / "data" / "models" / "cifar10-smallcnn2"
SWEEP = [round(0.9 + 0.005 * i, 3) for i in range(20)]
PRECISION_FOR_DUPLICATE = 0.95
RECALL_FOR_SIMILAR = 0.99


def make_folder(scratch: Path, per_class: int, skip: int) -> Path:
    cifar = scratch / "cifar10"
    if not (cifar / "test").is_dir():
        subprocess.run(["tar", "xzf", str(SHARED / "cifar10-jpeg.tar.gz"), "-C", str(scratch)], check=True)
    folder = scratch / f"dups-{per_class}-{skip}"
    if (folder / ".done").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    n = 0
    for cls in sorted(p for p in (cifar / "test").iterdir() if p.is_dir()):
        (folder / cls.name).mkdir(parents=True)
        for f in sorted(cls.glob("*.jpg"))[skip : skip + per_class]:
            data = f.read_bytes()
            (folder / cls.name / f"{f.stem}.orig.jpg").write_bytes(data)
            for name, fn in TRANSFORMS.items():
                copy, ext = fn(data)
                (folder / cls.name / f"{f.stem}.{name}{ext}").write_bytes(copy)
            n += 1
    (folder / ".done").touch()
    return folder


def add_exact_copies(index_dir: Path) -> None:
    """Every tenth original once more, same bytes and vector, as an upload would be (idempotent)."""
    from index.store import ImageIndex

    with ImageIndex.open(index_dir) as ix:
        records = [r for r in ix.records() if r.path.endswith(".orig.jpg")]
        have = {r.path for r in ix.records()}
        extra = [r for r in records[::10] if r.path.replace(".orig.", ".same.") not in have]
        if extra:
            ix.add(np.stack([ix.vector(r.id) for r in extra]),
                   [{**r.to_dict(), "path": r.path.replace(".orig.", ".same.")} for r in extra])
            ix.commit()


def owner_of(path: str) -> str:
    """`cls/0123.half.jpg` -> `cls/0123`: the original an item comes from."""
    cls, name = path.split("/")[-2:]
    return f"{cls}/{name.split('.')[0]}"


def pair_scores(vecs: np.ndarray, owners: np.ndarray, shas: list[str], lowest: float) -> tuple[np.ndarray, ...]:
    """Every pair with cosine >= lowest or the same bytes: (score, positive); and the number of positives."""
    same = np.array([s for s in shas])
    scores, positive = [], []
    for start in range(0, len(vecs), 1024):
        block = vecs[start : start + 1024] @ vecs.T
        rows, cols = np.nonzero(block >= lowest)
        rows_abs = rows + start
        keep = cols > rows_abs
        r, c = rows_abs[keep], cols[keep]
        s = block[rows[keep], cols[keep]]
        s = np.where(same[r] == same[c], 2.0, s)  # same bytes: found at every threshold
        scores.append(s)
        positive.append(owners[r] == owners[c])
    _, counts = np.unique(owners, return_counts=True)
    return np.concatenate(scores), np.concatenate(positive), int((counts * (counts - 1) // 2).sum())


def group_figures(index_dir: Path, threshold: float, owners_by_id: dict[int, str], kinds: dict[int, str]) -> dict:
    t0 = time.perf_counter()
    report = find_duplicates(index_dir, threshold)
    seconds = time.perf_counter() - t0
    group_of = {m.id: g.keeper for g in report.groups for m in g.items}
    originals = {owners_by_id[i]: i for i, k in kinds.items() if k == "orig"}
    copies = [i for i, k in kinds.items() if k not in ("orig", "same")]
    with_original = [group_of.get(i) is not None and group_of.get(i) == group_of.get(originals[owners_by_id[i]])
                     for i in copies]
    mixed = sum(1 for g in report.groups if len({owners_by_id[m.id] for m in g.items}) > 1)
    exact = [i for i, k in kinds.items() if k == "same"]
    exact_found = sum(group_of.get(i) is not None and group_of.get(i) == group_of.get(originals[owners_by_id[i]])
                      for i in exact)
    by_kind = {}
    for name in TRANSFORMS:
        ids = [i for i in copies if kinds[i] == name]
        by_kind[name] = round(float(np.mean([with_original[copies.index(i)] for i in ids])), 4)
    return {"threshold": threshold, "groups": len(report.groups), "copies_with_original": round(float(np.mean(with_original)), 4),
            "by_transform": by_kind, "groups_with_2plus_originals": mixed, "exact_found": f"{exact_found}/{len(exact)}",
            "seconds": round(seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(MODEL), help="model directory (simsearch export)")
    p.add_argument("--per-class", type=int, default=200, help="originals a class")
    p.add_argument("--skip", type=int, default=50, help="skip the first N test images a class (shipped in tests/data)")
    p.add_argument("--scratch", default="/tmp/simsearch-bench-duplicates", help="scratch directory")
    args = p.parse_args(argv)
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    folder = make_folder(scratch, args.per_class, args.skip)
    index_dir = scratch / f"index-{Path(args.model).resolve().name}-{args.per_class}-{args.skip}"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "simsearch", "index", "build", str(folder), "--model", args.model,
                    "--out", str(index_dir), "--no-progress", "--summary", str(scratch / "build.json")], check=True)
    build_s = time.perf_counter() - t0
    add_exact_copies(index_dir)
    export_index(index_dir, scratch / "vectors.npy")
    vecs = np.load(scratch / "vectors.npy")
    records = [json.loads(line) for line in (scratch / "vectors.jsonl").read_text().splitlines()]
    owners = np.array([owner_of(r["path"]) for r in records])
    kinds = {r["id"]: r["path"].split(".")[-2] for r in records}
    scores, positive, total = pair_scores(vecs, owners, [r["sha256"] for r in records], SWEEP[0])

    print(f"model {args.model}; {len(records)} items from {len(set(owners))} originals "
          f"(indexed in {build_s:.0f} s); {total} duplicate pairs")
    print(f"{'threshold':>9}  {'precision':>9}  {'recall':>7}  {'pairs found':>11}")
    rows = []
    for t in SWEEP:
        found = scores >= t
        tp = int((found & positive).sum())
        precision, recall = tp / max(int(found.sum()), 1), tp / total
        rows.append({"threshold": t, "precision": round(precision, 4), "recall": round(recall, 4), "found": int(found.sum())})
        print(f"{t:>9.3f}  {precision:>9.4f}  {recall:>7.4f}  {int(found.sum()):>11}")
    duplicate = min((r["threshold"] for r in rows if r["precision"] >= PRECISION_FOR_DUPLICATE), default=SWEEP[-1])
    similar = max((r["threshold"] for r in rows if r["recall"] >= RECALL_FOR_SIMILAR), default=SWEEP[0])
    similar = min(similar, round(duplicate - 0.005, 3))
    print(f"\nchosen defaults: duplicate {duplicate} (lowest with pair precision >= {PRECISION_FOR_DUPLICATE}), "
          f"similar {similar} (highest with pair recall >= {RECALL_FOR_SIMILAR})")
    owners_by_id = {r["id"]: owner_of(r["path"]) for r in records}
    groups = [group_figures(index_dir, t, owners_by_id, kinds) for t in (duplicate, similar)]
    for g in groups:
        print(f"groups at {g['threshold']}: {g['groups']} groups, copies in their original's group "
              f"{g['copies_with_original']:.1%} {g['by_transform']}, groups with 2+ originals "
              f"{g['groups_with_2plus_originals']}, exact copies found {g['exact_found']} ({g['seconds']} s)")
    print(json.dumps({"model": args.model, "items": len(records), "duplicate": duplicate, "similar": similar,
                      "sweep": rows, "groups": groups}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
