# Production image: CUDA PyTorch, the orchestrator, and ComfyUI's Python requirements baked in
# so that boot never pip-installs ComfyUI itself.
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

# Which ComfyUI the requirements come from (a branch, tag or commit of COMFY_REPO_URL).
ARG COMFY_REPO_URL=https://github.com/stakeordie/ComfyUI.git
ARG COMFY_REF=forward

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    ROOT=/workspace \
    COMFY_REPO_URL=${COMFY_REPO_URL}

RUN apt-get update \
 && apt-get install -y --no-install-recommends git openssh-client ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*

# ComfyUI's requirements, with the image's torch stack pinned so nothing replaces the CUDA build.
RUN git clone --filter=blob:none "${COMFY_REPO_URL}" /opt/comfyui-src \
 && git -C /opt/comfyui-src checkout "${COMFY_REF}" \
 && python -m pip freeze | grep -iE '^(torch|torchvision|torchaudio|xformers)==' > /opt/torch-constraints.txt \
 && python -m pip install -r /opt/comfyui-src/requirements.txt -c /opt/torch-constraints.txt \
 && rm -rf /opt/comfyui-src/.git

COPY . /opt/orchestrator
RUN python -m pip install /opt/orchestrator

WORKDIR /workspace
EXPOSE 9090 8188-8195

# Ready = enough instances READY (see MIN_READY_INSTANCES); cold starts with many custom
# nodes take minutes, hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15m --retries=3 CMD ["orchestrator", "health"]

# supervisord becomes the container's main process (exec), so SIGTERM stops every instance.
STOPSIGNAL SIGTERM
ENTRYPOINT ["orchestrator", "up", "--foreground"]
