"""TritonBackend: embeddings from a Triton Inference Server over `tritonclient` (gRPC or HTTP).

At start-up the served model's metadata and config are checked against the ModelSpec (input and
output names, UINT8 in / FP32 out, dims) and any mismatch raises BackendError naming what was
expected and what was found. Without a spec, the spec is read from the served config's
`simsearch_model_json` parameter (written by `export`), so a Triton URL is all a client needs.
Batches larger than `max_batch_size` (capped by the served model's own) are split.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import numpy as np

from embed.backends import BackendError
from embed.backends.base import check_batch
from embed.spec import ModelDirError, ModelSpec

log = logging.getLogger(__name__)

PROTOCOLS = ("grpc", "http")
SPEC_PARAMETER = "simsearch_model_json"
INPUT_DATATYPE = "UINT8"
OUTPUT_DATATYPE = "FP32"
READY_TIMEOUT_S = 2.0
_INT32_MAX = 2**31 - 1


def _split_url(url: str) -> tuple[str, bool]:
    """'host:port' as tritonclient wants it, and whether TLS was asked for (https://)."""
    for scheme in ("http://", "https://", "grpc://", "grpcs://"):
        if url.startswith(scheme):
            return url[len(scheme) :].rstrip("/"), scheme in ("https://", "grpcs://")
    return url.rstrip("/"), False


def _make_client(protocol: str, address: str, ssl: bool, timeout_s: float) -> Any:
    if protocol == "grpc":
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(
            address, ssl=ssl,
            channel_args=[
                ("grpc.max_send_message_length", _INT32_MAX),
                ("grpc.max_receive_message_length", _INT32_MAX),
                # Reconnect quickly once a restarted server is back (the default backoff grows to 120 s).
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(
        address, ssl=ssl, connection_timeout=timeout_s, network_timeout=timeout_s
    )


class TritonBackend:
    """The Backend protocol over a Triton server; thread-safe."""

    def __init__(
        self, url: str, *, protocol: str = "grpc", model_name: str | None = None, spec: ModelSpec | None = None,
        timeout_s: float = 30.0, max_batch_size: int = 64,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.url, self.protocol, self.timeout_s = url, protocol, timeout_s
        self._address, ssl = _split_url(url)
        self._is_grpc = protocol == "grpc"
        self._ssl = ssl
        # gRPC: one thread-safe client. HTTP: tritonclient's HTTP client runs on gevent, whose
        # connections belong to the thread that made them, so each thread gets its own.
        self._clients: list[Any] = []
        self._clients_lock = threading.Lock()
        self._local = threading.local()
        self._grpc = _make_client(protocol, self._address, ssl, timeout_s) if self._is_grpc else None
        if self._grpc is not None:
            self._clients.append(self._grpc)
        try:
            if not self._call("is_server_live"):
                raise BackendError(f"Triton at {url} ({protocol}) answers but is not live")
            self.model_name = model_name or (spec.name if spec is not None else self._only_model())
            if not self._call("is_model_ready", self.model_name):
                raise BackendError(
                    f"model {self.model_name!r} is not ready on Triton at {url}; ready models: {self._models()}"
                )
            metadata = self._call("get_model_metadata", self.model_name)
            config = self._call("get_model_config", self.model_name)
            config = config.get("config", config)  # gRPC JSON wraps the config; HTTP does not
            self.spec = spec if spec is not None else self._spec_from_config(config)
            self._check(metadata)
            if spec is not None:
                self._warn_if_spec_differs(config)
        except BaseException:
            self.close()
            raise
        served_max = int(config.get("max_batch_size", 0))
        self.max_batch_size = min(max_batch_size, served_max) if served_max > 0 else max_batch_size
        log.info("Triton backend: model %r at %s over %s, max batch %d",
                 self.model_name, url, protocol, self.max_batch_size)

    def _client(self, timeout_s: float | None = None) -> Any:
        """The client for this thread (gRPC: the shared one); `timeout_s` picks a short-timeout HTTP one."""
        if self._grpc is not None:
            return self._grpc
        attr = "ready_client" if timeout_s is not None else "client"
        client = getattr(self._local, attr, None)
        if client is None:
            client = _make_client(self.protocol, self._address, self._ssl, timeout_s or self.timeout_s)
            setattr(self._local, attr, client)
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """One client call; transport and server errors become BackendError."""
        from tritonclient.utils import InferenceServerException

        if self._is_grpc:
            kwargs["client_timeout"] = self.timeout_s
            if method in ("get_model_metadata", "get_model_config", "get_model_repository_index"):
                kwargs["as_json"] = True
        try:
            return getattr(self._client(), method)(*args, **kwargs)
        except InferenceServerException as e:
            raise BackendError(f"Triton at {self.url} ({self.protocol}): {e.message() or e}") from None
        except Exception as e:  # transport errors (refused, reset, timed out) of either client
            raise BackendError(
                f"Triton at {self.url} ({self.protocol}) is not reachable: {type(e).__name__}: {e}"
            ) from None

    def _models(self) -> list[str]:
        index = self._call("get_model_repository_index")
        models = index.get("models", []) if isinstance(index, dict) else index
        return sorted({m["name"] for m in models if m.get("state", "READY") == "READY"})

    def _only_model(self) -> str:
        models = self._models()
        if len(models) != 1:
            raise BackendError(
                f"Triton at {self.url} serves {len(models)} ready models {models}; choose one with model_name"
            )
        return models[0]

    def _spec_from_config(self, config: dict[str, Any]) -> ModelSpec:
        text = config.get("parameters", {}).get(SPEC_PARAMETER, {}).get("string_value")
        if not text:
            raise BackendError(
                f"served model {self.model_name!r} has no {SPEC_PARAMETER!r} parameter in its config; "
                "pass the ModelSpec (spec=, or the model directory's model.json)"
            )
        try:
            return ModelSpec.from_dict(json.loads(text))
        except (json.JSONDecodeError, ModelDirError, TypeError) as e:
            raise BackendError(f"served model {self.model_name!r}: bad {SPEC_PARAMETER} parameter: {e}") from None

    def _warn_if_spec_differs(self, config: dict[str, Any]) -> None:
        """Same shapes but another model (version, checkpoint, preprocessing): vectors would not match."""
        if not config.get("parameters", {}).get(SPEC_PARAMETER, {}).get("string_value"):
            return
        served = self._spec_from_config(config)
        fields = ("name", "version", "fingerprint", "checkpoint_sha256", "resize_mode", "resize_size", "interpolation", "mean", "std")
        differ = [f"{f}: given {getattr(self.spec, f)!r}, served {getattr(served, f)!r}"
                  for f in fields if getattr(self.spec, f) != getattr(served, f)]
        if differ:
            log.warning("served model %r differs from the given spec: %s", self.model_name, "; ".join(differ))

    def _check(self, metadata: dict[str, Any]) -> None:
        """Compare the served inputs/outputs with the spec; one BackendError listing every mismatch."""
        s = self.spec
        expected = {
            "input": (s.input_name, INPUT_DATATYPE, [-1, s.input_height, s.input_width, 3]),
            "output": (s.output_name, OUTPUT_DATATYPE, [-1, s.embedding_dim]),
        }
        problems = []
        for kind, (name, datatype, shape) in expected.items():
            served = metadata.get(f"{kind}s", [])
            names = [t["name"] for t in served]
            if len(served) != 1 or names[0] != name:
                problems.append(f"{kind}s: expected exactly [{name!r}], found {names}")
                continue
            found_type, found_shape = served[0]["datatype"], [int(d) for d in served[0]["shape"]]
            if found_type != datatype:
                problems.append(f"{kind} {name!r} datatype: expected {datatype}, found {found_type}")
            if found_shape != shape:
                problems.append(f"{kind} {name!r} shape: expected {shape}, found {found_shape}")
        if problems:
            raise BackendError(
                f"served model {self.model_name!r} at {self.url} does not match the model spec "
                f"{s.name!r} v{s.version}: " + "; ".join(problems)
            )

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 [N, D], in requests of at most max_batch_size images."""
        s = self.spec
        batch = check_batch(batch, s)
        if len(batch) == 0:
            return np.zeros((0, s.embedding_dim), dtype=np.float32)
        parts = [self._infer(batch[i : i + self.max_batch_size]) for i in range(0, len(batch), self.max_batch_size)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def _infer(self, chunk: np.ndarray) -> np.ndarray:
        if self._is_grpc:
            import tritonclient.grpc as client
        else:
            import tritonclient.http as client  # type: ignore[no-redef]
        tensor = client.InferInput(self.spec.input_name, list(chunk.shape), INPUT_DATATYPE)
        tensor.set_data_from_numpy(chunk)
        output = client.InferRequestedOutput(self.spec.output_name)
        result = self._call("infer", self.model_name, [tensor], outputs=[output])
        out = result.as_numpy(self.spec.output_name)
        if out is None or out.shape != (len(chunk), self.spec.embedding_dim):
            found = None if out is None else list(out.shape)
            raise BackendError(f"Triton returned {found} for a batch of {len(chunk)}; "
                               f"expected [{len(chunk)}, {self.spec.embedding_dim}]")
        return out.astype(np.float32, copy=False)

    def ready(self) -> bool:
        """Server live and model ready, asked now with a short timeout; never raises."""
        try:
            if self._grpc is not None:
                return bool(
                    self._grpc.is_server_live(client_timeout=READY_TIMEOUT_S)
                    and self._grpc.is_model_ready(self.model_name, client_timeout=READY_TIMEOUT_S)
                )
            client = self._client(READY_TIMEOUT_S)
            return bool(client.is_server_live() and client.is_model_ready(self.model_name))
        except Exception:  # any failure to answer means "not ready"
            return False

    def close(self) -> None:
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception as e:  # another thread's HTTP connection, or a dead one: not worth failing for
                log.debug("closing a Triton client: %s", e)

    def __repr__(self) -> str:
        return f"TritonBackend({self.url!r}, protocol={self.protocol!r}, model_name={getattr(self, 'model_name', None)!r})"
