# The API / indexer image: serving only, no PyTorch. The encoder runs in Triton (docker-compose.yml)
# or in-process with ONNX Runtime on the CPU (SIMSEARCH_MODEL_DIR instead of SIMSEARCH_TRITON_URL).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Only what serving imports: the training and export packages stay out of the image.
COPY pyproject.toml README.md ./
COPY simsearch ./simsearch
COPY embed ./embed
COPY index ./index
COPY server ./server
RUN pip install '.[serve,cpu]' \
    && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
    && useradd --system --uid 10001 --no-create-home simsearch \
    && mkdir -p /index && chown simsearch /index

USER simsearch
# On every interface, so the server refuses to start without SIMSEARCH_API_KEY (or an explicit
# SIMSEARCH_ALLOW_OPEN_WRITES=1): writes are never open to the network by accident.
ENV SIMSEARCH_HOST=0.0.0.0 \
    SIMSEARCH_PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4).status != 200)"
CMD ["simsearch", "serve"]
