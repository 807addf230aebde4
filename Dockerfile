# syntax=docker/dockerfile:1.7
# Gateway image: `.[serve]` only (no training code). GPU by default; CPU-only with
#   docker build --build-arg VARIANT=cpu -t mi-gateway:cpu .
# Build and run (GPU host with the NVIDIA Container Toolkit):
#   docker build -t mi-gateway .
#   docker run --gpus all -p 8080:8080 -v $PWD/artifacts/location30:/models:ro \
#     -e GATEWAY_NOISE_SECRET=$(openssl rand -hex 32) -e GATEWAY_DEFENSE=memguard mi-gateway
# The port is 8080 so the gateway can share a pod with a model server on 8000 (sidecar).
ARG PYTHON=3.12
ARG VARIANT=gpu
# The pinned pair: onnxruntime-gpu 1.28+ and PyPI's torch 2.14 both use CUDA 13 and
# cuDNN 9, so one copy of the CUDA libraries (pip wheels) serves both. torch is imported before the ORT
# session is created, which puts those libraries on the loader path.
ARG TORCH_VERSION=2.14.1
ARG ORT_VERSION=1.31.1

FROM python:${PYTHON}-slim AS build
ARG VARIANT
ARG TORCH_VERSION
ARG ORT_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the wheel that matches the variant; the project's torch range is then satisfied.
# GPU: PyPI's default Linux torch is a CUDA build; onnxruntime-gpu[cuda,cudnn] brings CUDA 13 and cuDNN 9
# from pip, shared with torch.
RUN if [ "$VARIANT" = "cpu" ]; then \
      pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu; \
    else \
      pip install "torch==${TORCH_VERSION}"; \
    fi
COPY pyproject.toml README.md LICENSE ./src/
# The versions the test suite ran with (regenerate with the development environment's versions).
COPY deploy/constraints.txt ./src/constraints.txt
# Only the gateway package: the serving image carries no training or attack code.
COPY gateway ./src/gateway
RUN if [ "$VARIANT" = "cpu" ]; then \
      pip install -c ./src/constraints.txt './src[serve]' "onnxruntime-gpu==${ORT_VERSION}"; \
    else \
      pip install -c ./src/constraints.txt './src[serve]' "onnxruntime-gpu[cuda,cudnn]==${ORT_VERSION}"; \
    fi \
 && python -c "import gateway, onnxruntime; onnxruntime.print_debug_info() if hasattr(onnxruntime, 'print_debug_info') else None"

FROM python:${PYTHON}-slim
RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin gateway
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080 \
    GATEWAY_ARTIFACTS=/models
USER 1000
WORKDIR /home/gateway
EXPOSE 8080
VOLUME ["/models"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["python", "-m", "gateway", "serve"]
