"""The server's one typed config, read from the environment (prefix SIMSEARCH_) and a `.env` file.

Precedence: keyword arguments (the CLI flags) > environment variables > `.env` > defaults.
An unknown key is an error wherever it comes from: a keyword argument, a `SIMSEARCH_*`
environment variable, or any line of `.env` (the file is the server's own settings file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "SIMSEARCH_"
MAX_SHARED_COMMIT_INTERVAL_MS = 10_000


class Settings(BaseSettings):
    """Everything `simsearch serve` can be told. Exactly one of `model_dir` / `triton_url`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        extra="forbid",
        frozen=True,
        protected_namespaces=(),
    )

    # the model: a local ONNX model directory (in-process ONNX Runtime) or a Triton server
    model_dir: Path | None = Field(None, description="model directory (model.onnx + model.json)")
    triton_url: str | None = Field(None, description="Triton server address, e.g. localhost:8001")
    triton_protocol: Literal["grpc", "http"] = "grpc"
    triton_model_name: str | None = Field(None, description="served model name (default: from the spec)")
    ort_intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0: ORT decides)")
    inference_nice: int = Field(
        0, ge=0, le=19, description="nice value added to the inference threads, so HTTP work keeps up (Linux)"
    )

    index_dir: Path = Field(..., description="index directory (created when missing)")
    index_memory_budget: str | None = Field(
        None,
        description="RAM the vector index may use once warm, e.g. 4GB (index/budget.py): given to an index the "
        "server creates; an existing index keeps its own (set it with `index build --memory-budget`)",
    )
    images_dir: Path | None = Field(
        None,
        description="where the indexed folder is on this machine: relative paths of folder-indexed items "
        "resolve here instead of the root recorded by `index build` (e.g. the images mounted elsewhere)",
    )

    # dynamic batching
    batch_size: int = Field(32, ge=1, le=4096, description="largest batch sent to the model")
    batch_wait_ms: float = Field(2.0, ge=0, le=1000, description="longest wait for a batch to fill")
    queue_max: int = Field(512, ge=1, description="images waiting for the model before 503")
    decode_workers: int = Field(2, ge=1, le=64, description="threads decoding uploads")

    # limits
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="largest request body (413)")
    max_images_per_request: int = Field(32, ge=1, description="most images in one request (413)")
    max_pixels: int = Field(40_000_000, ge=1, description="largest image, width x height (413)")
    max_k: int = Field(100, ge=1, le=10_000, description="most neighbours one search may ask for")

    # writes
    api_key: SecretStr | None = Field(None, description="required for POST/DELETE /v1/items when set")
    allow_open_writes: bool = Field(
        False,
        description="let a server on a non-loopback address start without api_key, its writes open to "
        "anyone who reaches it (without this it refuses to start)",
    )
    commit_interval_ms: int = Field(
        0,
        ge=0,
        description="0: a write is committed to disk before it is acknowledged (concurrent writes share "
        "one commit); N > 0: writes are acknowledged at once and committed every N ms",
    )
    thumbnail_size: int = Field(160, ge=16, le=1024, description="longest side of a thumbnail")

    # HTTP
    workers: int = Field(
        1, ge=1, le=256,
        description="server processes sharing the port and the index (server/workers.py); each runs "
        "ONNX Runtime with cores / workers intra-op threads unless ort_intra_op_threads is set",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    cors_origins: list[str] = Field(default_factory=list, description='e.g. ["https://example.org"]')

    @model_validator(mode="after")
    def _one_model_source(self) -> Settings:
        if (self.model_dir is None) == (self.triton_url is None):
            raise ValueError("set exactly one of model_dir (ONNX Runtime in-process) or triton_url (Triton)")
        return self

    @model_validator(mode="after")
    def _workers_commit_interval(self) -> Settings:
        # a worker holds SQLite's write lock from its first uncommitted write to its commit: the
        # other workers' writes wait that long (and fail after index/store.py's 60 s)
        if self.workers > 1 and self.commit_interval_ms > MAX_SHARED_COMMIT_INTERVAL_MS:
            raise ValueError(f"with workers > 1, commit_interval_ms must be at most {MAX_SHARED_COMMIT_INTERVAL_MS} "
                             f"(each worker's pending writes hold the index's write lock until committed); "
                             f"got {self.commit_interval_ms}")
        return self

    @model_validator(mode="after")
    def _no_empty_key(self) -> Settings:
        # an empty key would look configured to the start-up check yet protect nothing
        if self.api_key is not None and not self.api_key.get_secret_value().strip():
            raise ValueError("api_key is empty: set a real key, or leave it unset")
        return self

    @property
    def backend_name(self) -> str:
        return "onnxruntime" if self.model_dir is not None else "triton"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _UnknownEnvCheck(settings_cls), env_settings, dotenv_settings)


class _UnknownEnvCheck(PydanticBaseSettingsSource):
    """Contributes nothing; raises on a SIMSEARCH_* environment variable that names no setting."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        known = {name.upper() for name in self.settings_cls.model_fields}
        unknown = sorted(
            k for k in os.environ if k.upper().startswith(ENV_PREFIX) and k[len(ENV_PREFIX) :].upper() not in known
        )
        if unknown:
            valid = ", ".join(ENV_PREFIX + n.upper() for n in self.settings_cls.model_fields)
            raise ValueError(f"unknown setting(s) in the environment: {unknown}; valid: {valid}")
        return {}
