# Sourced by run.sh, run-envoy.sh and run-cluster.sh: start processes in the background, stop them all
# together on Ctrl-C, SIGTERM, or when any one of them exits (a crash, a port in use).

pids=()
stop() {
    trap - INT TERM
    stop_started
}
# stop_started: SIGTERM every started process and wait for them (again: a no-op).
stop_started() {
    # SIGTERM, not SIGINT: a second SIGINT makes uvicorn skip its graceful shutdown.
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    pids=()
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM

# start COMMAND [ARG...]: run it in the background, to be stopped with the others.
start() {
    "$@" &
    pids+=($!)
}

# supervise: wait until the first process exits, stop the rest, exit with its status.
supervise() {
    local status=0
    wait -n || status=$?
    stop
    exit "$status"
}
