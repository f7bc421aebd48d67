"""A real Triton Inference Server on the CPU for an exported model directory (`simsearch triton`).

Kept out of `server/` because it is no part of the HTTP API: it is the deployment's model server
for machines without Docker or a GPU, and it needs the `triton` extra (nvidia-pytriton, whose
bundled `tritonserver` wants glibc >= 2.35). `launcher` writes the model repository and runs the
server; `python_model` is the Python-backend model it copies into that repository.
"""
