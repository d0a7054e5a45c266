# deep-detection server image. Build: docker build -t deep-detection .
# Run (GPUs, enough shared memory for the rings: frontends x 633 MiB by default, see
# docs/operations.md; the server checks at start):
#   docker run --gpus all --shm-size=3g -p 50051:50051 deep-detection serve --frontends 4
#   docker run ... -v /path/to/models:/models deep-detection serve /models
FROM python:3.11-slim

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/deep-detection
# torch first, pinned: the CUDA build from PyPI (runs on the CPU where there is no GPU).
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1
COPY setup.cfg pyproject.toml README.md ./
COPY dd ./dd
COPY configs ./configs
COPY scripts ./scripts
RUN pip install --no-cache-dir -e .
RUN useradd --create-home --uid 10001 dd
USER dd
EXPOSE 50051
ENTRYPOINT ["deep-detection"]
CMD ["serve"]
