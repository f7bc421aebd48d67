"""embed/files.py: which files are images and the folder walk, the same for every stage."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from embed.files import IMAGE_EXTENSIONS, has_image_extension, is_image_name, walk_images

MESSY = Path(__file__).parent / "data" / "messy"


def _tree(tmp_path: Path) -> Path:
    """A folder with every case the rules name; outside/ is reached only through a symlink."""
    root = tmp_path / "photos"
    (root / "cats").mkdir(parents=True)
    (root / "dogs" / "deep").mkdir(parents=True)
    (root / ".thumbnails").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    jpg = (MESSY / "flower.jpg").read_bytes()
    for rel in ("cats/a.jpg", "cats/B.JPG", "cats/c.Jpeg", "cats/d.jfif", "dogs/deep/e.png", "top.webp",
                ".thumbnails/t.jpg", "cats/.hidden.jpg", "cats/._a.jpg", "cats/notes.txt", "cats/noext",
                "cats/jpg", "dogs/.DS_Store"):
        (root / rel).write_bytes(jpg)
    (outside / "o.gif").write_bytes((MESSY / "hopper.gif").read_bytes())
    os.symlink(root / "cats" / "a.jpg", root / "dogs" / "link-to-a.jpg")  # a symlinked file
    os.symlink(outside, root / "linked")  # a symlinked folder outside the root
    os.symlink(outside, root / "dogs" / "linked-again")  # a second link to the same folder
    os.symlink(root, root / "dogs" / "deep" / "loop")  # a loop back to the root
    os.symlink(root / "cats", root / "a-link-to-cats")  # a link to a folder that is in the tree anyway
    os.symlink(tmp_path / "gone.jpg", root / "cats" / "dangling.jpg")  # a broken link, image-named
    os.symlink(tmp_path / "gone", root / "cats" / "dangling-dir")  # a broken link, not image-named
    os.mkfifo(root / "cats" / "pipe.png")  # never opened: reading a FIFO would block
    (root / "folder.jpg").mkdir()  # a folder with an image-like name is a folder
    (root / "folder.jpg" / "f.bmp").write_bytes((MESSY / "hopper.bmp").read_bytes())
    # names in another encoding than UTF-8 (Latin-1 bytes): a file, and a folder with an image in it
    (root / os.fsdecode(b"caf\xe9.jpg")).write_bytes(jpg)
    (root / os.fsdecode(b"d\xe9j\xe0")).mkdir()
    (root / os.fsdecode(b"d\xe9j\xe0") / "g.jpg").write_bytes(jpg)
    (root / os.fsdecode(b"notes-\xe9.txt")).write_bytes(b"not an image: not reported")
    return root


def test_walk_rules(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    listing = walk_images(root)
    rels = [f.rel for f in listing.files]
    assert rels == [
        "cats/B.JPG", "cats/a.jpg", "cats/c.Jpeg", "cats/d.jfif",  # any case; .jfif counts
        "dogs/deep/e.png",
        "dogs/link-to-a.jpg",  # symlinked file: listed under the link's own path
        "folder.jpg/f.bmp",
        "linked/o.gif",  # symlinked folder outside the root: followed once, under its first link
        "top.webp",
    ]
    # hidden files and folders, non-image names, the loop, the second link and the alias of cats/
    # (in the tree anyway, so it keeps its real path) add nothing
    # a name that is not UTF-8 cannot be stored or answered as text: reported in an escaped form
    not_utf8 = "name is not valid UTF-8; rename it"
    assert listing.skipped == [("caf\\xe9.jpg", not_utf8), ("cats/dangling.jpg", "broken symlink"),
                               ("cats/pipe.png", "not a regular file"), ("d\\xe9j\\xe0", not_utf8)]
    by_rel = {f.rel: f for f in listing.files}
    assert by_rel["dogs/link-to-a.jpg"].path == root / "dogs" / "link-to-a.jpg"
    assert by_rel["dogs/link-to-a.jpg"].size == (root / "cats" / "a.jpg").stat().st_size
    assert all(f.path == root / f.rel for f in listing.files)


def test_walk_of_a_hidden_root_and_errors(tmp_path: Path) -> None:
    hidden = tmp_path / ".cache"
    hidden.mkdir()
    shutil.copy(MESSY / "tiny.png", hidden / "x.png")
    assert [f.rel for f in walk_images(hidden).files] == ["x.png"]  # only names below the root count
    with pytest.raises(FileNotFoundError, match="not found"):
        walk_images(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        walk_images(hidden / "x.png")


def test_extension_rule() -> None:
    assert has_image_extension("IMG_0001.JPG") and has_image_extension("a/b/c.HeIc")
    assert not has_image_extension("jpg") and not has_image_extension("notes.txt") and not has_image_extension("x.")
    assert not is_image_name(".x.jpg") and not is_image_name("._x.jpg") and is_image_name("x.jpg")
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)
    # only the walk's extensions count: a stage may narrow the list
    assert [f.rel for f in walk_images(MESSY, {".GIF"}).files] == ["decompression_bomb.gif", "hopper.gif",
                                                                   "iss634.gif", "transparent.gif"]


def test_every_stage_lists_the_same_files(tmp_path: Path) -> None:
    from export.verify import list_images as export_list
    from index.scan import scan_folder
    from pretrain.data import list_images as pretrain_list
    from server.upload_store import KNOWN_EXTENSIONS

    root = _tree(tmp_path)
    expected = [f.rel for f in walk_images(root).files]
    assert list(scan_folder(root)) == expected
    listing = pretrain_list(root)
    assert [p.relative_to(root).as_posix() for p in listing.paths] == expected
    assert listing.classes == ["cats", "dogs", "folder.jpg", "linked"]
    assert listing.labels[expected.index("top.webp")] == -1  # directly under the root: no class
    assert [p.relative_to(root).as_posix() for p in export_list([root], 1000)] == expected
    assert {"." + e for e in KNOWN_EXTENSIONS} == IMAGE_EXTENSIONS  # uploads keep the same extensions
