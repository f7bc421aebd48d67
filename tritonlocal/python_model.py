"""Triton Python-backend model that runs an exported `model.onnx` with ONNX Runtime on the CPU.

This file is copied as `<repository>/<name>/1/model.py` by `tritonlocal.launcher` and runs inside
Triton's Python-backend stub, where `triton_python_backend_utils` exists; nothing imports it
from the package. The model's config.pbtxt names the ONNX file (`onnx_model_path`) and the ONNX
Runtime thread count (`intra_op_threads`). With dynamic batching Triton hands several requests
to one `execute` call; they are run as one ONNX Runtime batch and split back.
"""

from __future__ import annotations

import json
from typing import Any


def _parameter(config: dict[str, Any], key: str, default: str = "") -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        import numpy as np
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        self._np = np
        self._input_name = config["input"][0]["name"]
        self._output_name = config["output"][0]["name"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(_parameter(config, "intra_op_threads", "0"))
        options.inter_op_num_threads = 1
        # Spinning threads would burn the CPU between requests of a mostly idle server.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            _parameter(config, "onnx_model_path"), sess_options=options, providers=["CPUExecutionProvider"]
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        np = self._np
        arrays = [pb_utils.get_input_tensor_by_name(r, self._input_name).as_numpy() for r in requests]
        sizes = [len(a) for a in arrays]
        batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
        out = self._session.run([self._output_name], {self._input_name: batch})[0]
        responses = []
        start = 0
        for n in sizes:
            tensor = pb_utils.Tensor(self._output_name, np.ascontiguousarray(out[start : start + n]))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            start += n
        return responses

    def finalize(self) -> None:
        self._session = None
