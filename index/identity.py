"""Does this index belong to this model? One answer, used by the builder, the store and the server.

A model is identified by its fingerprint (embed/spec.py: model.onnx and the pixel rule), plus
its name, version and embedding dimension. An index records, in its metadata, the identity of
the model that wrote its current vectors (`model_fingerprint`, `model_name`, `model_version`,
`dim`) and one `model_history` entry per vector generation (a `--reembed` switch starts a new one).

The rule (`check`):

- both fingerprints known: equal -> the same model (a renamed model is still the same one);
  different -> `IndexModelMismatch`;
- the dimensions differ -> `IndexModelMismatch`;
- the index has no fingerprint (built before fingerprints existed): the same model when name and
  version agree, or the index recorded none (name "", version 0) ("adopt": a writer records the
  fingerprint on open, with a warning, because the old index cannot prove which weights wrote
  it); else `IndexModelMismatch`;
- the model has no fingerprint (only possible over Triton, serving a model exported before
  fingerprints existed): `IndexModelMismatch` when the index has one (re-export the model),
  else name and version decide, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from embed.spec import ModelSpec
from index.schema import IndexDirError

logger = logging.getLogger(__name__)

SAME, ADOPT, UNVERIFIED = "same", "adopt", "unverified"


class IndexModelMismatch(IndexDirError):
    """The index holds vectors of another model than the one given; the message says what to do."""


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    version: int
    dim: int
    fingerprint: str  # "" when unknown

    @classmethod
    def of_spec(cls, spec: ModelSpec) -> ModelIdentity:
        return cls(spec.name, int(spec.version), int(spec.embedding_dim), spec.fingerprint)

    @classmethod
    def of_index(cls, meta: Mapping[str, Any]) -> ModelIdentity:
        return cls(str(meta.get("model_name") or ""), int(meta.get("model_version") or 0), int(meta["dim"]),
                   str(meta.get("model_fingerprint") or ""))

    def describe(self) -> str:
        fp = f"fingerprint {self.fingerprint[:12]}…" if self.fingerprint else "no fingerprint"
        return f"model {self.name!r} v{self.version} (dim {self.dim}), {fp}"

    def as_meta(self) -> dict[str, Any]:
        return {"model_name": self.name, "model_version": self.version, "dim": self.dim,
                "model_fingerprint": self.fingerprint}


def check(meta: Mapping[str, Any], spec: ModelSpec | ModelIdentity, *, directory: object = "the index") -> str:
    """SAME, ADOPT (legacy index: record the fingerprint) or UNVERIFIED (model without fingerprint).

    Raises IndexModelMismatch with a one-line message saying what to do otherwise.
    """
    built = ModelIdentity.of_index(meta)
    given = spec if isinstance(spec, ModelIdentity) else ModelIdentity.of_spec(spec)
    verdict = _verdict(built, given)
    if verdict is None:
        raise IndexModelMismatch(mismatch_message(directory, built, given))
    return verdict


def _verdict(built: ModelIdentity, given: ModelIdentity) -> str | None:
    if built.dim != given.dim:
        return None
    if built.fingerprint and given.fingerprint:
        return SAME if built.fingerprint == given.fingerprint else None
    if not _same_name(built, given):
        return None
    if not built.fingerprint:
        return ADOPT if given.fingerprint else UNVERIFIED
    return None  # the index knows its model's fingerprint, the model does not know its own


def _same_name(built: ModelIdentity, given: ModelIdentity) -> bool:
    """Name and version agree; an index that recorded none (name "", version 0) does not object."""
    return (not built.name or built.name == given.name) and (not built.version or built.version == given.version)


def mismatch_message(directory: object, built: ModelIdentity, given: ModelIdentity) -> str:
    if built.fingerprint and not given.fingerprint and built.dim == given.dim:
        return (f"{directory} was built with {built.describe()}; this {given.describe()} cannot be checked "
                "against it: re-export the model with `simsearch export` (model.json then carries its "
                "fingerprint) and serve that")
    return (f"{directory} was built with {built.describe()}, this is {given.describe()}: run "
            f"`simsearch index build FOLDER --out {directory} --model MODEL --reembed` to re-embed it with "
            "this model, or use the model it was built with")


def warn_if_unverified(verdict: str, directory: object, spec: ModelSpec | ModelIdentity) -> None:
    given = spec if isinstance(spec, ModelIdentity) else ModelIdentity.of_spec(spec)
    if verdict == ADOPT:
        logger.warning("%s records no model fingerprint (built before fingerprints existed); name, version and "
                       "dimension match %s, so it is taken to be this model's", directory, given.describe())
    elif verdict == UNVERIFIED:
        logger.warning("%s cannot verify that its vectors come from %s: neither records a fingerprint; "
                       "re-export the model to make the check exact", directory, given.describe())
