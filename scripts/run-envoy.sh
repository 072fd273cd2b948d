#!/usr/bin/env bash
# `make run-envoy`: seed the demo, then run policyd, the reference hub behind Envoy, and Envoy
# (adapters/envoy/envoy.yaml) until Ctrl-C. docs/envoy.md explains the set-up.
#
#   client -> Envoy http://127.0.0.1:10000 -> hub 127.0.0.1:8001 (POLICYD_HUB_GATEWAY=envoy)
#                 `-> policyd 127.0.0.1:50051 (ext_authz v3, gRPC)
#
# Environment: BIN (the venv's bin, default .venv/bin), VAR (demo token and hub data, default
# var), ENVOY_PORT, HUB_PORT, ENVOY_ADMIN_PORT (defaults 10000, 8001, 9901; other values
# render the sample with adapters/envoy/config.py), POLICYD_* for policyd. Ctrl-C (or SIGTERM)
# stops all three; so does any one of them exiting.
set -euo pipefail

BIN=${BIN:-.venv/bin}
VAR=${VAR:-var}
ENVOY_PORT=${ENVOY_PORT:-10000}
HUB_PORT=${HUB_PORT:-8001}
ENVOY_ADMIN_PORT=${ENVOY_ADMIN_PORT:-9901}
POLICYD_ADDRESS=${POLICYD_SERVER_ADDRESS:-127.0.0.1:50051}
export POLICYD_HUB_HOST=127.0.0.1
export POLICYD_HUB_PORT=$HUB_PORT
export POLICYD_HUB_DATA_DIR=${POLICYD_HUB_DATA_DIR:-$VAR/hub}
export POLICYD_HUB_GATEWAY=envoy

mkdir -p "$VAR"
"$BIN/policyd" demo seed --token-file "$VAR/demo-alice.token"

config=adapters/envoy/envoy.yaml
if [ "$ENVOY_PORT:$HUB_PORT:$ENVOY_ADMIN_PORT:$POLICYD_ADDRESS" != "10000:8001:9901:127.0.0.1:50051" ]; then
    config=$VAR/envoy.json
    "$BIN/python" -m adapters.envoy.config --listen "$ENVOY_PORT" --hub "$HUB_PORT" \
        --admin "$ENVOY_ADMIN_PORT" --policyd "${POLICYD_ADDRESS##*:}" --out "$config"
fi

envoy="http://127.0.0.1:$ENVOY_PORT"
cat <<WALK

policyd, the hub and Envoy are starting (Ctrl-C stops all three). The hub trusts Envoy's
x-policyd-* headers: use it only through Envoy at $envoy. In another terminal, try:
  TOKEN=\$(cat $VAR/demo-alice.token)
  curl -i -H "Authorization: Bearer \$TOKEN" $envoy/api/data/tags/edge-historian   # 200
  curl -i -H "Authorization: Bearer \$TOKEN" $envoy/api/data/tags/plant-mes        # 403
  curl -i -H "Authorization: Bearer \$TOKEN" $envoy/api/data/v2/snapshot \\
       -d '{"tags": {"edge-historian": ["FIC-601.PV"], "plant-mes": ["X"]}}'          # 403
  $BIN/policyd grants revoke alice demo-app edge-historian
  curl -i -H "Authorization: Bearer \$TOKEN" $envoy/api/data/tags/edge-historian   # 403
  $BIN/policyd grants add alice demo-app edge-historian --access write

WALK

source "$(dirname "$0")/supervise.sh"

start "$BIN/policyd" serve
start "$BIN/python" -m examples.hub
start "$BIN/envoy" -c "$config" --use-dynamic-base-id --log-level warn

supervise
