#!/usr/bin/env bash
# `make run`: seed the demo, then run policyd and the protected reference hub until Ctrl-C;
# data source plant-mes is served by a connector over the link (docs/link.md): a "plant"
# upstream (the hub's data code behind no middleware, on 127.0.0.1 only) and
# policyd-connector, which dials the hub's link listener over TLS (certificates: $VAR/tls).
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
# The hub holds edge-historian and lab-lims; plant-mes is at the plant, behind the link.
export POLICYD_HUB_DATA_SOURCES=${POLICYD_HUB_DATA_SOURCES:-edge-historian,lab-lims}
export POLICYD_HUB_LINK_ADDRESS=${POLICYD_HUB_LINK_ADDRESS:-127.0.0.1:8443}
export POLICYD_HUB_LINK_CERT_FILE=${POLICYD_HUB_LINK_CERT_FILE:-$VAR/tls/server.pem}
export POLICYD_HUB_LINK_KEY_FILE=${POLICYD_HUB_LINK_KEY_FILE:-$VAR/tls/server.key}
PLANT_PORT=${PLANT_PORT:-8600}

mkdir -p "$VAR"
"$BIN/policyd" demo seed --token-file "$VAR/demo-alice.token" \
    --connector-secret-file "$VAR/plant-connector.secret"
# A local CA and the link listener's certificate (kept while valid).
"$BIN/python" -m adapters.link.certs --dir "$VAR/tls"
# The connector's own config (docs/link.md). `policyd demo seed` registers plant-connector
# owning plant-mes and writes its secret to $VAR/plant-connector.secret (mode 0600). The
# link is TLS, trusting $VAR/tls/ca.pem; the demo's token endpoint is plain HTTP, which the
# connector takes only on loopback (docs/link.md, "Configuration").
cat >"$VAR/connector.toml" <<TOML
hub_url = "https://$POLICYD_HUB_LINK_ADDRESS"
token_url = "http://${POLICYD_OAUTH_ADDRESS:-127.0.0.1:8080}/token"
client_id = "plant-connector"
client_secret_file = "$VAR/plant-connector.secret"
ca_file = "$VAR/tls/ca.pem"

[reconnect]
delay_seconds = 0.5
delay_max_seconds = 10

[sources.plant-mes]
url = "http://127.0.0.1:$PLANT_PORT"
TOML

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

plant-mes is served by the connector over the link (docs/link.md):
  $BIN/policyd grants add alice demo-app plant-mes
  curl -i -H "Authorization: Bearer \$TOKEN" $hub/api/data/tags/plant-mes        # 200, via the link
  $BIN/policyd connectors disable plant-connector
  curl -i -H "Authorization: Bearer \$TOKEN" $hub/api/data/tags/plant-mes        # 503

Or click through the whole flow in a browser: open http://127.0.0.1:${POLICYD_CLIENT_PORT:-8090}
and sign in as alice / alice-demo; take access back at http://127.0.0.1:8080/settings.

WALK

source "$(dirname "$0")/supervise.sh"

start "$BIN/policyd" serve
start "$BIN/python" -m examples.hub
start "$BIN/python" -m examples.client
# The plant: plant-mes's data, trusting the decision headers the hub sends down the link;
# reachable on 127.0.0.1 only, by the connector.
start env POLICYD_HUB_GATEWAY=envoy POLICYD_HUB_HOST=127.0.0.1 POLICYD_HUB_PORT="$PLANT_PORT" \
    POLICYD_HUB_DATA_SOURCES=plant-mes POLICYD_HUB_DATA_DIR="$VAR/plant" \
    POLICYD_HUB_METRICS_ADDRESS= POLICYD_HUB_LINK_ADDRESS= "$BIN/python" -m examples.hub
start "$BIN/python" -m adapters.link.connector --config "$VAR/connector.toml"

supervise
