# syntax=docker/dockerfile:1.7
# The offline job's image (`defense_models`: train, shadows, export, audit), for deploy/k8s/shadow-job.yaml:
#   docker build -f deploy/train.Dockerfile -t mi-gateway-train:0.1.0 .
# CPU torch: the shadow models are small MLPs, and a Job spreads them over pods instead of GPUs. Location30
# ships inside the package; other datasets are mounted and passed with --data.
ARG PYTHON=3.12
ARG TORCH_VERSION=2.14.1
ARG ORT_VERSION=1.31.1

FROM python:${PYTHON}-slim
ARG TORCH_VERSION
ARG ORT_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md LICENSE ./src/
COPY deploy/constraints.txt ./src/constraints.txt
COPY gateway ./src/gateway
COPY defense_models ./src/defense_models
RUN pip install -c ./src/constraints.txt './src[train,eval]' "onnxruntime-gpu==${ORT_VERSION}" \
 && python -c "import defense_models, gateway"
RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin train
USER 1000
WORKDIR /home/train
ENTRYPOINT ["python", "-m", "defense_models"]
