# Production image: CUDA PyTorch, the orchestrator, and ComfyUI's Python requirements baked in
# so that boot never pip-installs ComfyUI itself.
#
#   docker build -t comfy-orchestrator .                      # provisions ROOT on first boot
#   docker build -t comfy-orchestrator --build-arg BAKE=1 .   # ROOT baked in: a cold boot only starts
#
# The base is pinned by digest (a tag can be re-pushed); override both to move it.
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
ARG BASE_DIGEST=sha256:c8268a92a69bd500f8be0e665b2630ee006dadaf7bfbc24249141b15ff622755
FROM ${BASE_IMAGE}@${BASE_DIGEST}

# Which ComfyUI the requirements come from (a branch, tag or commit of COMFY_REPO_URL).
ARG COMFY_REPO_URL=https://github.com/stakeordie/ComfyUI.git
ARG COMFY_REF=forward
# 1: run `orchestrator up --provision-only` at build time (ComfyUI, the shared config, every
# custom node and its pip requirements, the before_start models in ROOT). Pass the secrets that
# needs as build secrets, never as build args.
ARG BAKE=0
# The image's user (non-root: the NVIDIA container runtime needs no root inside the container).
ARG UID=1000

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    ROOT=/workspace \
    HOME=/home/comfy \
    COMFY_REPO_URL=${COMFY_REPO_URL}

# tini is PID 1: it forwards SIGTERM to the orchestrator while it provisions (Python as PID 1
# ignores it) and reaps orphans.
RUN apt-get update \
 && apt-get install -y --no-install-recommends git openssh-client ca-certificates curl tini \
 && rm -rf /var/lib/apt/lists/*

# ComfyUI's requirements, with the image's torch stack pinned so nothing replaces the CUDA build.
RUN git clone --filter=blob:none "${COMFY_REPO_URL}" /opt/comfyui-src \
 && git -C /opt/comfyui-src checkout "${COMFY_REF}" \
 && python -m pip freeze | grep -iE '^(torch|torchvision|torchaudio|xformers)==' > /opt/torch-constraints.txt \
 && python -m pip install -r /opt/comfyui-src/requirements.txt -c /opt/torch-constraints.txt \
 && rm -rf /opt/comfyui-src/.git

# The orchestrator's dependencies in their own layer, from setup.cfg alone: a code change
# rebuilds only the small layers below.
COPY setup.cfg pyproject.toml /opt/orchestrator/
RUN python -c "import configparser; c = configparser.ConfigParser(); c.read('/opt/orchestrator/setup.cfg'); \
print(c['options']['install_requires'] + c['options.extras_require']['runpod'])" > /opt/orchestrator-requirements.txt \
 && python -m pip install -r /opt/orchestrator-requirements.txt -c /opt/torch-constraints.txt

COPY . /opt/orchestrator
RUN python -m pip install --no-deps /opt/orchestrator \
 && install -m 0755 /opt/orchestrator/deploy/docker/entrypoint.sh /usr/local/bin/orchestrator-entrypoint \
 && useradd --uid "${UID}" --create-home --home-dir /home/comfy --shell /bin/sh comfy \
 && mkdir -p /workspace && chown comfy:comfy /workspace

USER comfy
# Custom nodes' requirements go to the user's site-packages (~/.local), not the image's.
ENV PIP_USER=1
WORKDIR /workspace

RUN if [ "${BAKE}" = "1" ]; then \
      orchestrator up --provision-only && touch /workspace/.orchestrator/baked; \
    fi

# The monitor (health, metrics, job API). The instances (8188 + GPU index) are reachable from
# outside the container only with COMFY_LISTEN=0.0.0.0 (README: Fleet).
EXPOSE 9090 8188-8195

# Liveness is the orchestrator's own health (probe loop running, supervisord answering), not
# every instance READY: one bad GPU must not get the whole machine killed. Readiness for load
# balancers is GET /readyz (MIN_READY_INSTANCES). Cold starts with many custom nodes take
# minutes, hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15m --retries=3 CMD ["orchestrator", "health", "--live"]

# MODE=machine (default): `orchestrator up --foreground`, which execs supervisord; SIGTERM makes
# the monitor drain (SHUTDOWN_DRAIN_TIMEOUT), then every instance stops.
# MODE=runpod: the RunPod serverless worker (`orchestrator runpod-worker`) over the local job API.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "orchestrator-entrypoint"]
