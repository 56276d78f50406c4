# syntax=docker/dockerfile:1
# Multi-stage image of the service. CPU by default:
#   docker build -t loop .
#   docker run -p 3000:3000 loop
# CUDA: the same image plus NVIDIA's CUDA and cuDNN wheels, which ONNX Runtime preloads; the
# driver comes from the host (NVIDIA Container Toolkit):
#   docker build -t loop:cuda --build-arg ORT_EXTRAS="[cuda,cudnn]" .
#   docker run --gpus all -p 3000:3000 -e LOOP_DEVICE=cuda loop:cuda
# Training the default model inside the build takes seconds on the CPU, so torch is always the
# CPU build; only inference uses the GPU.
ARG PYTHON_VERSION=3.11

# ---- build: a virtual environment with the project and its pinned dependencies ----
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG ORT_EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml constraints.txt README.md ./
COPY models/ models/
COPY feedback/ feedback/
COPY service/ service/
# The CLI imports `loop demo-loop` from experiments/, which starts its servers with harness/.
COPY harness/ harness/
COPY experiments/ experiments/
COPY requirements/no-deps.txt requirements/no-deps.txt
RUN /opt/venv/bin/pip install --extra-index-url "${TORCH_INDEX_URL}" -c constraints.txt ".[s3,remote]" \
 && /opt/venv/bin/pip install --no-deps -c constraints.txt "$(grep '^crowd-kit==' requirements/no-deps.txt)" \
 && if [ -n "${ORT_EXTRAS}" ]; then \
      /opt/venv/bin/pip install -c constraints.txt "onnxruntime-gpu${ORT_EXTRAS}"; fi

# ---- model: train the default model into a BentoML store inside the image ----
FROM build AS model
ENV BENTOML_HOME=/opt/bentoml BENTOML_DO_NOT_TRACK=True LOOP_VAR_DIR=/opt/var
RUN /opt/venv/bin/loop train

# ---- runtime: non-root, only the environment, the store and the code ----
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
RUN useradd --create-home --uid 10001 loop
ENV PATH=/opt/venv/bin:$PATH \
    BENTOML_HOME=/opt/bentoml \
    BENTOML_DO_NOT_TRACK=True \
    LOOP_VAR_DIR=/var/lib/loop \
    LOOP_HOST=0.0.0.0 \
    LOOP_PORT=3000 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/venv /opt/venv
COPY --from=model --chown=loop:loop /opt/bentoml /opt/bentoml
COPY --from=model --chown=loop:loop /opt/var /var/lib/loop
# The code is installed in the environment; `loop serve` points BentoML at it.
WORKDIR /home/loop
USER loop
EXPOSE 3000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:3000/readyz').status != 200)"
CMD ["loop", "serve", "--no-train"]
