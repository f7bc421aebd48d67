"""The one error type of `export/`: a user mistake or a model that failed its checks."""

from __future__ import annotations


class ExportError(RuntimeError):
    """Export cannot go on: a bad checkpoint, bad options, or an ONNX model that failed verification.

    The message is one line, written for the person who ran the command.
    """


class VerificationError(ExportError):
    """The exported ONNX model failed its checks (checker or parity): not the user's mistake."""
