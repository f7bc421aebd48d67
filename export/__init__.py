"""export/: a SimCLR checkpoint -> a verified model directory (ONNX + model.json + Triton repository).

    from export import export_model
    spec = export_model("runs/simclr/last.pt", "model/", fp16=True, verify_images=["photos/"])

The projection head stays behind; the ONNX graph takes uint8 images and returns l2-normalised
embeddings (see embed/spec.py for the contract). Importing this package loads PyTorch.
"""

from export.errors import ExportError
from export.exporter import ExportConfig, export_model
from export.triton_repo import TritonOptions, write_triton_repository
from export.verify import Tolerance

__all__ = ["ExportConfig", "ExportError", "Tolerance", "TritonOptions", "export_model", "write_triton_repository"]
