# deep-detection server image.
#   docker build -t deep-detection:0.1.0 .
#
# ENTRYPOINT is `deep-detection`, CMD is `serve`; `serve` without a path serves the model whose
# node_config.json NODE_CONFIG_FILE names, and the built-in demo models when it is not set.
# Relative paths are relative to the working directory, /workspace. The rings need /dev/shm:
# 633 MiB per frontend at the default image size limit, and there are cores / 4 frontends (at
# most 8) unless --frontends says otherwise. 5g covers any host; tmpfs takes memory only as
# images fill the slots (docs/operations.md; the server checks at start and says what it needs).
#
#   docker run --gpus all --shm-size=5g -p 50051:50051 deep-detection:0.1.0
#   docker run --gpus all --shm-size=5g -p 50051:50051 \
#       -v "$PWD/model_repository:/workspace/model_repository:ro" \
#       -e NODE_CONFIG_FILE=model_repository/my-model/node_config.json deep-detection:0.1.0
#   docker run ... -v /path/to/models:/models:ro deep-detection:0.1.0 serve /models --frontends 2
#
# Kubernetes: deploy/kubernetes.yaml and docs/deploy.md.
FROM python:3.11-slim

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# A C compiler: Triton, which runs the fast engine's GPU kernels, compiles a small C launcher for
# each kernel at first use (without one, each kernel falls back to slower torch operations).
# Nothing for OpenCV: opencv-python-headless carries its own libraries and needs no libGL.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/deep-detection
# torch first, pinned: the CUDA build from PyPI (runs on the CPU where there is no GPU).
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1
COPY setup.cfg pyproject.toml README.md ./
COPY dd ./dd
COPY configs ./configs
COPY scripts ./scripts
RUN pip install --no-cache-dir -e . && python -m compileall -q dd
# A fixed numeric uid:gid, so that Kubernetes' runAsNonRoot can check it; deploy/*.yaml run as it.
RUN useradd --create-home --uid 10001 --user-group dd && mkdir /workspace && chown dd:dd /workspace
USER 10001:10001
WORKDIR /workspace
EXPOSE 50051 8002
ENTRYPOINT ["deep-detection"]
CMD ["serve"]
