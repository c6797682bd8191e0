# Style Template Studio on an NVIDIA GPU.
#   docker build -t style-studio .
#   docker run --gpus all -p 7860:7860 -v studio-data:/data -e HF_TOKEN=... style-studio
# The data volume holds templates, runs and the Hugging Face cache (model weights), so they
# survive container upgrades.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
        git fonts-dejavu-core redis-tools \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv $VIRTUAL_ENV

# torch first (on Linux x86_64 the default wheel is the CUDA build), pinned so requirements.txt's
# range is already satisfied and pip does not pull another build.
ARG TORCH_VERSION=2.13.0
RUN pip install --upgrade pip \
 && pip install "torch==${TORCH_VERSION}"
COPY requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt bitsandbytes

# (Ubuntu 24.04 images already use uid 1000 for "ubuntu", so let useradd pick one.)
RUN useradd --create-home studio \
 && mkdir -p /data \
 && chown studio:studio /data
WORKDIR /app
COPY --chown=studio:studio . /app
USER studio

ENV STUDIO_STORE=/data/templates_store \
    STUDIO_RUNS=/data/runs \
    STUDIO_CACHE=/data/cache \
    HF_HOME=/data/hf \
    GRADIO_ANALYTICS_ENABLED=False \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860
VOLUME ["/data"]
EXPOSE 7860

# Binding 0.0.0.0 inside the container is needed for -p to work; protect it with --auth or
# STUDIO_AUTH=user:password when the port is reachable by others.
CMD ["python", "app.py", "--host", "0.0.0.0", "--port", "7860"]
