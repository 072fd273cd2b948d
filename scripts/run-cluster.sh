#!/usr/bin/env bash
# `make run-cluster`: a private PostgreSQL, the demo seeded into it, three `policyd serve`
# replicas sharing it, the reference hub behind Envoy, and ONE Envoy whose ext_authz cluster
# balances over the three replicas (round robin), until Ctrl-C.
#
#   client -> Envoy http://127.0.0.1:10000 -> hub 127.0.0.1:8001 (POLICYD_HUB_GATEWAY=envoy)
#                 `-> policyd replica-1 127.0.0.1:50061 \
#                     policyd replica-2 127.0.0.1:50062  > ext_authz v3 (gRPC), round robin
#                     policyd replica-3 127.0.0.1:50063 /
#                           `-> PostgreSQL 127.0.0.1:55432, data in $VAR/pg
#
# Only replica-1 serves the authorization server (oauth.address, 127.0.0.1:8080 by default);
# the others run with POLICYD_OAUTH_ENABLED=false, since one port takes one process.
#
# Environment: BIN (the venv's bin, default .venv/bin), VAR (PostgreSQL's folder, the demo
# token, keys, audit journals and hub data; default var), PG_PORT (default 55432),
# REPLICA_PORTS (default "50061 50062 50063"; one replica per port, replica-1, replica-2...),
# ENVOY_PORT, HUB_PORT, ENVOY_ADMIN_PORT (defaults 10000, 8001, 9901), POLICYD_* for the
# replicas (docs/configuration.md; POLICYD_STORE_URL, POLICYD_SERVER_ADDRESS,
# POLICYD_CLUSTER_NODE and POLICYD_SERVER_WORKERS are set here, and
# POLICYD_SERVER_CPU_AFFINITY defaults to none). Ctrl-C (or SIGTERM) stops
# everything, PostgreSQL included; so does any one process exiting, or a failed start.
set -euo pipefail

BIN=${BIN:-.venv/bin}
VAR=${VAR:-var}
PG_PORT=${PG_PORT:-55432}
PG_DIR=$VAR/pg
REPLICA_PORTS=${REPLICA_PORTS:-50061 50062 50063}
ENVOY_PORT=${ENVOY_PORT:-10000}
HUB_PORT=${HUB_PORT:-8001}
ENVOY_ADMIN_PORT=${ENVOY_ADMIN_PORT:-9901}
read -r -a replica_ports <<<"$REPLICA_PORTS"
if [ "${#replica_ports[@]}" -lt 1 ]; then
    echo "run-cluster: REPLICA_PORTS names no port" >&2
    exit 2
fi

# Everything the replicas and the CLI share lives under $VAR (for VAR=var, the defaults);
# store.path is unused on PostgreSQL but places the replicas' policy-status files.
export POLICYD_STORE_PATH=${POLICYD_STORE_PATH:-$VAR/policyd.db}
export POLICYD_TOKENS_KEY_DIR=${POLICYD_TOKENS_KEY_DIR:-$VAR/keys}
export POLICYD_AUDIT_PATH=${POLICYD_AUDIT_PATH:-$VAR/audit.db}
export POLICYD_AUDIT_KEY_FILE=${POLICYD_AUDIT_KEY_FILE:-$VAR/audit.key}
export POLICYD_OAUTH_SESSION_KEY_FILE=${POLICYD_OAUTH_SESSION_KEY_FILE:-$VAR/oauth-session.key}
export POLICYD_SERVER_WORKERS=1
# Three lone servers on one host: "auto" would pin each to the first CPU; let the kernel
# place them (on separate hosts, each replica keeps "auto").
export POLICYD_SERVER_CPU_AFFINITY=${POLICYD_SERVER_CPU_AFFINITY:-none}
export POLICYD_HUB_HOST=127.0.0.1
export POLICYD_HUB_PORT=$HUB_PORT
export POLICYD_HUB_DATA_DIR=${POLICYD_HUB_DATA_DIR:-$VAR/hub}
export POLICYD_HUB_GATEWAY=envoy

source "$(dirname "$0")/supervise.sh"

# Every way out (Ctrl-C, SIGTERM, a process exiting, a failed step) ends in cleanup: the
# processes, then PostgreSQL. Stopping ignores further Ctrl-C and SIGTERM (supervise.sh's
# `stop` would restore their default, and a second Ctrl-C would then kill this shell
# without its EXIT trap, leaving PostgreSQL running).
pg_started=
stop() {
    trap '' INT TERM
    stop_started
}
cleanup() {
    local status=$?
    stop
    if [ -n "$pg_started" ]; then
        pg_started=
        "$BIN/python" -m policyd.pgserver stop "$PG_DIR" || true
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$VAR"
if "$BIN/python" -m policyd.pgserver status "$PG_DIR"; then
    # Another run-cluster's, or one left by a run that was killed: not ours to stop.
    echo "run-cluster: a PostgreSQL server already runs in $PG_DIR; stop it first:" \
        "$BIN/python -m policyd.pgserver stop $PG_DIR" >&2
    exit 1
fi
pg_started=yes # also a start that failed half-way (pgserver stop is a no-op without a server)
if ! POLICYD_STORE_URL=$("$BIN/python" -m policyd.pgserver start "$PG_DIR" --port "$PG_PORT" 2>"$VAR/pg-start.err"); then
    reason=$(tail -n 20 "$PG_DIR/postgres.log" 2>/dev/null | grep -E 'FATAL|could not bind' |
        sed -E 's/^.*(FATAL|LOG): +//' | paste -sd '|' | sed 's/|/; /g' || true)
    echo "run-cluster: PostgreSQL did not start in $PG_DIR on port $PG_PORT:" \
        "${reason:-$(head -n 1 "$VAR/pg-start.err")} (log: $PG_DIR/postgres.log)" >&2
    exit 1
fi
rm -f "$VAR/pg-start.err"
export POLICYD_STORE_URL
"$BIN/policyd" demo seed --token-file "$VAR/demo-alice.token"

config=$VAR/envoy-cluster.json
policyd_args=()
for port in "${replica_ports[@]}"; do policyd_args+=(--policyd "$port"); done
"$BIN/python" -m adapters.envoy.config --listen "$ENVOY_PORT" --hub "$HUB_PORT" \
    --admin "$ENVOY_ADMIN_PORT" "${policyd_args[@]}" --out "$config"

envoy="http://127.0.0.1:$ENVOY_PORT"
nodes=$(for i in "${!replica_ports[@]}"; do printf 'replica-%d ' $((i + 1)); done)
nodes=${nodes% }
exports="export POLICYD_STORE_URL=$POLICYD_STORE_URL"
if [ "$VAR" != var ]; then
    exports+=" POLICYD_STORE_PATH=$POLICYD_STORE_PATH POLICYD_TOKENS_KEY_DIR=$POLICYD_TOKENS_KEY_DIR"
    exports+=" POLICYD_AUDIT_PATH=$POLICYD_AUDIT_PATH POLICYD_AUDIT_KEY_FILE=$POLICYD_AUDIT_KEY_FILE"
fi
cat <<WALK

PostgreSQL ($POLICYD_STORE_URL), ${#replica_ports[@]} policyd replicas on 127.0.0.1 ports
${replica_ports[*]}, the hub and Envoy are starting (Ctrl-C stops them all). Envoy asks the
replicas in turn. In another terminal, try:
  $exports
  TOKEN=\$(cat $VAR/demo-alice.token)
  curl -i -H "Authorization: Bearer \$TOKEN" $envoy/api/data/tags/edge-historian   # 200
  $BIN/policyd grants revoke alice demo-app edge-historian      # returns once every replica knows
  curl -i -H "Authorization: Bearer \$TOKEN" $envoy/api/data/tags/edge-historian   # 403, any replica
  for port in ${replica_ports[*]}; do   # ask each replica directly
      $BIN/policyd check --server 127.0.0.1:\$port --token @$VAR/demo-alice.token \\
          --path /api/data/tags/edge-historian
  done                                                            # deny DATA_SOURCE_NOT_GRANTED x${#replica_ports[@]}
  $BIN/policyd audit query --since 5m --user alice --json      # each record names its "node"
  for node in $nodes; do $BIN/policyd audit query --since 5m --door envoy --decision deny --node \$node; done
  $BIN/policyd grants add alice demo-app edge-historian --access write

WALK

i=0
for port in "${replica_ports[@]}"; do
    i=$((i + 1))
    oauth=()
    [ "$i" -eq 1 ] || oauth=(POLICYD_OAUTH_ENABLED=false)
    start env "${oauth[@]}" POLICYD_CLUSTER_NODE="replica-$i" \
        POLICYD_SERVER_ADDRESS="127.0.0.1:$port" "$BIN/policyd" serve
done
start "$BIN/python" -m examples.hub
start "$BIN/envoy" -c "$config" --use-dynamic-base-id --log-level warn

supervise
