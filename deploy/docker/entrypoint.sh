#!/bin/sh
# The image's entry point, run under tini (PID 1: it forwards SIGTERM and reaps orphans, so a
# `docker stop` during the clone or pip of a cold boot stops at once instead of waiting out the
# grace period).
#
#   MODE=machine (default)  orchestrator up --foreground: provision, then exec supervisord
#                           (instances + monitor); SIGTERM drains the job API, then stops all.
#   MODE=runpod             orchestrator up (supervisord in the background), then exec
#                           orchestrator runpod-worker: the RunPod serverless handler over the
#                           local job API. Arguments go to the worker (--test_input ...).
#
# A baked image (BAKE=1 at build time) holds ROOT already provisioned: unless COMFY_UPDATE is
# set, the boot does not fetch ComfyUI or the shared repo again (COMFY_UPDATE=never).
set -eu

ROOT="${ROOT:-/workspace}"
if [ -e "$ROOT/.orchestrator/baked" ] && [ -z "${COMFY_UPDATE:-}" ]; then
  export COMFY_UPDATE=never
fi

case "${MODE:-machine}" in
  machine)
    exec orchestrator up --foreground "$@"
    ;;
  runpod)
    orchestrator up
    exec orchestrator runpod-worker "$@"
    ;;
  *)
    echo "invalid MODE=${MODE}: expected machine or runpod" >&2
    exit 2
    ;;
esac
