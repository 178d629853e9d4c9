#!/usr/bin/env bash
# deploy/README.md, Steps 1 to 5, as a script: a coordinator and two hospitals on this machine's
# loopback, with TLS and SuperNode authentication, one short run.
#
# Each step_* function below is one command block of the guide, verbatim (tests/test_deploy_guide.py
# checks that they are the same text, in the same order), so the guide cannot drift from the code.
# Everything around them plays the parts the guide leaves to people: the values of "The values
# used below", a data protection officer's policy, the secure channel that brings a hospital its
# files, and waiting for each process to be up.
#
# Run from anywhere, with FedFusion's venv active (fedfusion, flwr, flower-* on PATH):
#   deploy/guide.sh
# Optional settings: GUIDE_ROOT (a folder for everything; default: a new temporary one),
# GUIDE_SUPERLINK_PORT, GUIDE_SUPERNODE_PORTS ("<port-a> <port-b>"; default: free ports),
# GUIDE_RUN_CONFIG (the run's settings; default: a one-round tiny run). Every process it
# starts is stopped when it ends; the logs stay in $GUIDE_ROOT/logs.
set -euo pipefail

# --- the guide's command blocks ------------------------------------------------------------------

step_1_credentials() {
mkdir -p "$FEDFUSION_DIR"
fedfusion certs "$FEDFUSION_DIR/credentials" \
    --san fedfusion.example-consortium.org --san 203.0.113.10 --san localhost --san 127.0.0.1 \
    --hospital hospital-a --hospital hospital-b
}

step_1_hospital_keys() {
fedfusion certs "$SITE_DIR/keys" --keys-only --hospital "$SITE_NAME"
# -> $SITE_DIR/keys/hospitals/$SITE_NAME/supernode.key (keep) and supernode.pub (send to the coordinator)
}

step_2_superlink() {
flower-superlink \
    --ssl-ca-certfile "$FEDFUSION_DIR/credentials/ca.crt" \
    --ssl-certfile "$FEDFUSION_DIR/credentials/server.crt" \
    --ssl-keyfile "$FEDFUSION_DIR/credentials/server.key" \
    --enable-supernode-auth \
    --host 0.0.0.0 --port "$SUPERLINK_PORT" \
    --database "$FEDFUSION_DIR/superlink.db" \
    --disable-runtime-dependency-installation
}

step_3_config() {
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "consortium"

[superlink.consortium]
address = "$SUPERLINK_ADDRESS"
root-certificates = "$FEDFUSION_DIR/credentials/ca.crt"
EOF
}

step_3_register() {
flwr supernode register "$FEDFUSION_DIR/credentials/hospitals/hospital-a/supernode.pub" consortium --name hospital-a
flwr supernode register "$FEDFUSION_DIR/credentials/hospitals/hospital-b/supernode.pub" consortium --name hospital-b
flwr supernode list consortium      # status: registered, then online once the hospital connects
}

step_4_policy_and_secret() {
fedfusion privacy check-policy "$SITE_DIR/policy.toml"
head -c 32 /dev/urandom > "$SITE_DIR/superexec.secret" && chmod 600 "$SITE_DIR/superexec.secret"
}

step_4_supernode() {
flower-supernode \
    --superlink "$SUPERLINK_ADDRESS" \
    --root-certificates "$SITE_DIR/ca.crt" \
    --auth-supernode-private-key "$SITE_DIR/supernode.key" \
    --isolation process --host 127.0.0.1 --port "$SUPERNODE_PORT" \
    --superexec-auth-secret-file "$SITE_DIR/superexec.secret"
}

step_4_node() {
fedfusion node --supernode "127.0.0.1:$SUPERNODE_PORT" \
    --superexec-auth-secret-file "$SITE_DIR/superexec.secret" \
    --node-config "manifest='$SITE_DATA' state-dir='$SITE_STATE' policy='$SITE_DIR/policy.toml' site-name='$SITE_NAME' device='cpu'"
}

step_5_run() {
fedfusion run . consortium --run-config "$RUN_CONFIG output-dir='$FEDFUSION_DIR/outputs' site-nodes='$SITE_NODES'"
flwr list consortium                     # every run and its status
}

step_5_privacy_report() {
fedfusion privacy report "$SITE_STATE"
}

# --- what the guide leaves to people, on one machine ---------------------------------------------

shopt -s inherit_errexit
HOSPITALS=(hospital-a hospital-b)
START_TIMEOUT=120  # seconds for the SuperLink to listen and for both hospitals to be online
STARTED=$SECONDS
PIDS=()

free_port() {
    python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

coordinator() {  # "The values used below", on the coordinator
    export FEDFUSION_DIR="$GUIDE_ROOT/coordinator"
    export SUPERLINK_PORT="$SUPERLINK_PORT"
    export SUPERLINK_ADDRESS="127.0.0.1:$SUPERLINK_PORT"  # a --san of Step 1
    export FLWR_HOME="$GUIDE_ROOT/coordinator/flwr-home"
}

hospital() {  # "The values used below", at hospital number $1 (0, 1, ...)
    local ports=($SUPERNODE_PORTS)
    export SITE_NAME="${HOSPITALS[$1]}"
    export SITE_DIR="$GUIDE_ROOT/$SITE_NAME/etc"
    export SITE_DATA="$GUIDE_ROOT/data/hospital-$1/manifest.csv"
    export SITE_STATE="$GUIDE_ROOT/$SITE_NAME/state"
    export SUPERLINK_ADDRESS="127.0.0.1:$SUPERLINK_PORT"
    export SUPERNODE_PORT="${ports[$1]}"
    export FLWR_HOME="$GUIDE_ROOT/$SITE_NAME/flwr-home"
}

as_coordinator() { (coordinator && "$@"); }
as_hospital() { (hospital "$1" && "${@:2}"); }

background() {  # start `$2...` in the background, its output in logs/$1.log
    "${@:2}" >"$GUIDE_ROOT/logs/$1.log" 2>&1 &
    PIDS+=($!)
}

tree() {  # a process and all its descendants, children first
    local child
    for child in $(pgrep -P "$1" || true); do tree "$child"; done
    echo "$1"
}

stop_all() {
    local status=$? victims=() pid log
    for pid in "${PIDS[@]}"; do victims+=($(tree "$pid")); done
    if [ ${#victims[@]} -gt 0 ]; then
        kill "${victims[@]}" 2>/dev/null || true
        for _ in $(seq 20); do
            kill -0 "${victims[@]}" 2>/dev/null || break
            sleep 0.5
        done
        kill -9 "${victims[@]}" 2>/dev/null || true
    fi
    if [ "$status" -ne 0 ]; then
        for log in "$GUIDE_ROOT"/logs/*.log; do echo "--- $log" && tail -n 30 "$log"; done
        echo "guide.sh: failed (exit code $status); logs in $GUIDE_ROOT/logs"
    fi
}

wait_for() {  # wait_for <what> <command...>: until the command succeeds, at most START_TIMEOUT s
    local deadline=$((SECONDS + START_TIMEOUT))
    until ("${@:2}") >/dev/null 2>&1; do
        if [ $SECONDS -gt $deadline ]; then
            echo "guide.sh: waiting for $1: not within $START_TIMEOUT s"
            return 1
        fi
        sleep 1
    done
}

listening() { (: <"/dev/tcp/127.0.0.1/$SUPERLINK_PORT") 2>/dev/null; }

all_online() {
    flwr supernode list consortium --format json | python -c '
import json, sys
text = sys.stdin.read()
nodes = json.loads(text[text.index("{"):])["nodes"]
sys.exit(sum(n["status"] == "online" for n in nodes) != int(sys.argv[1]))' "${#HOSPITALS[@]}"
}

if ! command -v fedfusion >/dev/null || ! command -v flwr >/dev/null; then
    echo "guide.sh: fedfusion and flwr are not on PATH: activate FedFusion's venv (source .venv/bin/activate)."
    exit 2
fi
cd "$(dirname "$0")/.."  # the FedFusion folder (Step 0): Step 5 ships it
GUIDE_ROOT="${GUIDE_ROOT:-$(mktemp -d -t fedfusion-guide-XXXXXX)}"
SUPERLINK_PORT="${GUIDE_SUPERLINK_PORT:-$(free_port)}"
SUPERNODE_PORTS="${GUIDE_SUPERNODE_PORTS:-$(free_port) $(free_port)}"
mkdir -p "$GUIDE_ROOT/logs"
trap stop_all EXIT
echo "guide.sh: a coordinator and ${#HOSPITALS[@]} hospitals in $GUIDE_ROOT"

# the hospitals' data (a tiny demo set) and the policies their data protection officers write
fedfusion demo-data "$GUIDE_ROOT/data" --hospitals "${#HOSPITALS[@]}" --size-scale 0.1 >/dev/null
for i in "${!HOSPITALS[@]}"; do
    as_hospital "$i" bash -c 'mkdir -p "$SITE_DIR" && printf "%s\n" "max-epsilon = 8.0" \
        "budget-scope = \"run\"" "min-eval-records = 5" >"$SITE_DIR/policy.toml"'
done

echo "== Step 1, coordinator: credentials"
as_coordinator step_1_credentials
for i in "${!HOSPITALS[@]}"; do as_hospital "$i" step_1_hospital_keys; done

echo "== Step 2, coordinator: start the SuperLink"
background superlink as_coordinator step_2_superlink
wait_for "the SuperLink to listen on port $SUPERLINK_PORT" listening

echo "== Step 3, coordinator: connect flwr and register the hospitals"
as_coordinator step_3_config
registered="$(as_coordinator step_3_register)"
echo "$registered"
ids=($(echo "$registered" | grep -o 'SuperNode [0-9]* registered' | cut -d' ' -f2))
if [ ${#ids[@]} -ne ${#HOSPITALS[@]} ]; then
    echo "guide.sh: registration gave ${#ids[@]} node IDs, not ${#HOSPITALS[@]}"
    exit 1
fi

echo "== Step 4, each hospital: start the SuperNode and the FedFusion node"
for i in "${!HOSPITALS[@]}"; do
    # the secure channel: the coordinator's CA certificate and the hospital's private key
    cp "$GUIDE_ROOT/coordinator/credentials/ca.crt" "$GUIDE_ROOT/${HOSPITALS[$i]}/etc/"
    cp "$GUIDE_ROOT/coordinator/credentials/hospitals/${HOSPITALS[$i]}/supernode.key" \
        "$GUIDE_ROOT/${HOSPITALS[$i]}/etc/"
    as_hospital "$i" step_4_policy_and_secret
    background "${HOSPITALS[$i]}-supernode" as_hospital "$i" step_4_supernode
    background "${HOSPITALS[$i]}-node" as_hospital "$i" step_4_node
done
wait_for "both hospitals online" as_coordinator all_online

echo "== Step 5, coordinator: run the federation"
export SITE_NODES="${ids[0]}=${HOSPITALS[0]},${ids[1]}=${HOSPITALS[1]}"
export RUN_CONFIG="${GUIDE_RUN_CONFIG:-run-name='guide' preset='tiny' accountant='rdp' num-server-rounds=1 local-epochs=1}"
as_coordinator step_5_run 2>&1 | tee "$GUIDE_ROOT/logs/fedfusion-run.log"
for i in "${!HOSPITALS[@]}"; do as_hospital "$i" step_5_privacy_report; done
echo "guide.sh: every step ran in $((SECONDS - STARTED)) s; run folder: $GUIDE_ROOT/coordinator/outputs"
