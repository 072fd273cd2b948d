#!/usr/bin/env bash
# `make run`: seed the demo, then run policyd and the protected reference hub until Ctrl-C.
#
# Environment: BIN (the venv's bin, default .venv/bin), VAR (where the demo token and the
# hub's data go, default var), POLICYD_* for policyd (docs/configuration.md) and
# POLICYD_HUB_* for the hub (docs/hub.md). Ctrl-C (or SIGTERM) stops both; so does either
# one exiting.
set -euo pipefail

BIN=${BIN:-.venv/bin}
VAR=${VAR:-var}
export POLICYD_HUB_HOST=${POLICYD_HUB_HOST:-127.0.0.1}
export POLICYD_HUB_PORT=${POLICYD_HUB_PORT:-8000}
export POLICYD_HUB_DATA_DIR=${POLICYD_HUB_DATA_DIR:-$VAR/hub}
# Prometheus metrics of policyd (docs/metrics.md): on in the demo, off by default elsewhere.
export POLICYD_METRICS_ADDRESS=${POLICYD_METRICS_ADDRESS:-127.0.0.1:9464}
# The hub's own: its middleware's calls to policyd, their failures, the answers it gave.
export POLICYD_HUB_METRICS_ADDRESS=${POLICYD_HUB_METRICS_ADDRESS:-127.0.0.1:9465}

mkdir -p "$VAR"
"$BIN/policyd" demo seed --token-file "$VAR/demo-alice.token"

hub="http://$POLICYD_HUB_HOST:$POLICYD_HUB_PORT"
cat <<WALK

policyd and the hub are starting (Ctrl-C stops both). In another terminal, try:
  TOKEN=\$(cat $VAR/demo-alice.token)
  curl -i -H "Authorization: Bearer \$TOKEN" $hub/api/data/tags/edge-historian   # 200
  curl -i -H "Authorization: Bearer \$TOKEN" $hub/api/data/tags/plant-mes        # 403
  $BIN/policyd grants revoke alice demo-app edge-historian
  curl -i -H "Authorization: Bearer \$TOKEN" $hub/api/data/tags/edge-historian   # 403
  $BIN/policyd grants add alice demo-app edge-historian --access write
  curl -s http://$POLICYD_METRICS_ADDRESS/metrics | grep '^policyd_decisions_total'
  curl -s http://$POLICYD_HUB_METRICS_ADDRESS/metrics | grep '^policyd_middleware'

Or click through the whole flow in a browser: open http://127.0.0.1:${POLICYD_CLIENT_PORT:-8090}
and sign in as alice / alice-demo; take access back at http://127.0.0.1:8080/settings.

WALK

source "$(dirname "$0")/supervise.sh"

start "$BIN/policyd" serve
start "$BIN/python" -m examples.hub
start "$BIN/python" -m examples.client

supervise
