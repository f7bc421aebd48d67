"""Re-embed every item of an index with another model: `simsearch index build ... --reembed`.

Every item is embedded again — files of the indexed folder (paths relative to its root) and images
added through the server (absolute paths, their bytes under INDEX/uploads/) — into the side table
of the store (`begin_reembed`, `stage_reembed`), committed every `commit_every` items. Readers (a
running server) keep searching the old vectors meanwhile; a killed run resumes where its last
batch was committed. Then `switch_reembed` swaps every vector, the model identity and the vector
generation in one transaction, embedding there whatever was added meanwhile, so no item keeps a
vector of the old model.

An item whose bytes can no longer be read or decoded, or whose content changed since it was
indexed, cannot get a vector of the new model: it is dropped at the switch and listed with its
reason in the summary (`dropped`). A changed folder file comes back in the same run, as a new
item, when the folder is indexed after the switch; an upload whose file is gone is gone.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from embed.decode import DecodeError
from embed.embedder import Embedder
from index.identity import ModelIdentity
from index.records import IndexedFile
from index.schema import UPLOADS_DIR
from index.store import ImageIndex, Staged

logger = logging.getLogger(__name__)


def item_source(index_dir: Path, root: str, path: str) -> Path:
    """Where an item's bytes are: a folder file under the root, or an upload under INDEX/uploads/."""
    p = Path(path)
    if not p.is_absolute():
        return Path(root) / p
    if not p.is_file() and (moved := index_dir / UPLOADS_DIR / p.name).is_file():
        return moved  # the index directory was moved or is mounted elsewhere (compose)
    return p


def embed_items(embedder: Embedder, items: list[IndexedFile], index_dir: Path, root: str) -> Iterator[Staged]:
    """(id, new vector, None) or (id, None, why it is dropped) for each item, in order."""
    changed: set[int] = set()

    def load(item: IndexedFile) -> bytes:
        data = item_source(index_dir, root, item.path).read_bytes()
        if hashlib.sha256(data).hexdigest() != item.sha256:
            changed.add(item.id)
        return data

    for item, result, _ in embedder.iter_embed(items, load=load):
        if isinstance(result, DecodeError):
            yield item.id, None, {"path": item.path, "reason": result.reason, "message": result.message}
        elif item.id in changed:
            changed.discard(item.id)
            yield item.id, None, {"path": item.path, "reason": "changed",
                                  "message": "its content changed since it was indexed"}
        else:
            yield item.id, result, None


def reembed_index(index: ImageIndex, embedder: Embedder, *, root: str, commit_every: int = 512,
                  progress: bool = True) -> dict[str, Any]:
    """Re-embed every item of `index` with `embedder`'s model and switch to it; returns the summary."""
    spec = embedder.spec
    before = index.model
    resumed = index.begin_reembed(spec)
    pending = index.reembed_pending()
    logger.info("re-embedding %d items with %s (%d done by an earlier run)", len(pending),
                ModelIdentity.of_spec(spec).describe(), resumed)
    batch: list[Staged] = []
    with tqdm(total=len(pending), unit="img", desc="re-embedding", disable=not progress, smoothing=0.1) as bar:
        for staged in embed_items(embedder, pending, index.directory, root):
            batch.append(staged)
            bar.update()
            if len(batch) >= commit_every:
                index.stage_reembed(spec, batch)
                batch = []
        index.stage_reembed(spec, batch)
    switched = index.switch_reembed(spec, lambda missing: list(embed_items(embedder, missing, index.directory, root)))
    return {"from": before.as_meta(), "to": ModelIdentity.of_spec(spec).as_meta(), "resumed": resumed,
            **switched}
