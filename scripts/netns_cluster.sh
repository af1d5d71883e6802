#!/usr/bin/env bash
# A multi-node Ray cluster on one Linux machine: each Ray node in its own network namespace,
# the namespaces joined by a Linux bridge that lives in a namespace of its own, with no route
# out. Inside a node 127.0.0.1 is that node's own loopback, so code that assumes one host
# breaks here the way it breaks on a real cluster. The filesystem, /dev/shm and the process
# table stay shared. tests/cluster/ runs the multi-node tests on it.
#
#   netns_cluster.sh up               namespaces + bridge, `ray start` on every node, `ray status`
#   netns_cluster.sh down             kill every process of every node namespace, delete the
#                                     namespaces (idempotent, safe after a failed `up`)
#   netns_cluster.sh status           `ray status` from the head
#   netns_cluster.sh exec NODE CMD..  run CMD inside NODE with the cluster's environment
#                                     (RAY_ADDRESS, RAY_AUTH_MODE, the ray binary's dir on PATH)
#   netns_cluster.sh pids NODE        the pids in NODE's namespace
#   netns_cluster.sh kill-node NODE   SIGKILL every process of NODE (a node that dies); its
#                                     namespace stays, so `start-node` brings it back
#   netns_cluster.sh start-node NODE  `ray start` NODE again (a worker node rejoining the head)
# NODE is a node's short name (head, n2, n3 by default), not its namespace.
#
# Gotchas, all measured on this machine (see also README "Run on a cluster"):
# - Ray workers and `ray job submit` entrypoints inherit the cwd and the whole environment
#   (PATH, PYTHONPATH, ...) of `ray start`, not the driver's. `up` starts every node from
#   TEMP_ROOT, a neutral cwd, so a relative path in our code fails here as on a real cluster.
# - One --temp-dir per node. The session dir name is cluster-wide: two nodes on one temp dir
#   share logs/, and every worker's output then reaches the driver twice.
# - RAY_AUTH_MODE must be the same on servers and clients (a ~/.ray/auth_token turns token
#   auth on otherwise); this script passes RAY_AUTH_MODE (default disabled) to everything.
# - Never run `ray stop`: it finds every Ray on the machine through the shared process table
#   (other clusters, other tests' embedded Rays) and stops them all. A node is stopped by
#   killing `ip netns pids <ns>`, which is what `down` and `kill-node` do. Always give clients
#   an address (RAY_ADDRESS / --address): without one Ray scans the process table for any
#   gcs_server and may attach to someone else's.
# - Each node believes it owns the machine (all CPUs, 30 % of RAM as object store, all in the
#   one /dev/shm): --num-cpus and --object-store-memory are always set. Logical CPUs may
#   exceed the physical ones.
# - gcs_server ignores SIGTERM: `down` waits STOP_GRACE_S, then SIGKILLs what is left.
# - `ray start` logs that it could not find its IP "via external connectivity"; with
#   --node-ip-address set and no route out, that is harmless.
# - The dashboard binds only SUBNET.1: `ray job submit --address http://SUBNET.1:DASH_PORT`.
#
# Two clusters can run side by side (a developer's and a test run's): give each its own TAG.
# Their addresses may be the same, since each bridge namespace is a network of its own.
#
# Settings (environment; defaults in brackets):
#   TAG             namespaces are TAG-<node> and TAG-br                          [pc]
#   NODES           node short names; the first is the head                      [head n2 n3]
#   SUBNET          /24 prefix; node i (from 1) is SUBNET.i                      [198.18.0]
#   GCS_PORT        head GCS port                                                [6379]
#   DASH_PORT       dashboard port (on SUBNET.1)                                 [8265]
#   NODE_CPUS       logical CPUs per node, space separated                       [2 2 3]
#   NODE_RESOURCES  custom resources per node, '|' separated JSON
#                   [{"buffer_node": 1}|{"trainer_node": 1}|{"rollout_node": 2}]
#   OBJECT_STORE_BYTES  object store per node                                    [268435456]
#   TEMP_ROOT       node temp dirs are TEMP_ROOT/<node>; keep it short (unix socket paths
#                   under it must stay below 108 bytes)                         [/tmp/rayns-TAG]
#   STOP_GRACE_S    seconds between SIGTERM and SIGKILL in `down`                [15]
#   RAY             the ray binary                                               [ray on PATH]
#   RAY_AUTH_MODE   passed to every Ray process and client                       [disabled]
# Any other variable of the caller (RAY_health_check_* for example) reaches `ray start`.
# Needs root and iproute2. Only SUBNET addresses and the namespaces' own loopbacks are used.
set -eEuo pipefail

TAG=${TAG:-pc}
read -r -a NODES <<<"${NODES:-head n2 n3}"
SUBNET=${SUBNET:-198.18.0}
GCS_PORT=${GCS_PORT:-6379}
DASH_PORT=${DASH_PORT:-8265}
read -r -a NODE_CPUS <<<"${NODE_CPUS:-2 2 3}"
DEFAULT_RESOURCES='{"buffer_node": 1}|{"trainer_node": 1}|{"rollout_node": 2}'
IFS='|' read -r -a NODE_RESOURCES <<<"${NODE_RESOURCES:-$DEFAULT_RESOURCES}"
OBJECT_STORE_BYTES=${OBJECT_STORE_BYTES:-268435456}
TEMP_ROOT=${TEMP_ROOT:-/tmp/rayns-$TAG}
STOP_GRACE_S=${STOP_GRACE_S:-15}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
BRIDGE_NS=$TAG-br
RAY_BIN=$(command -v "${RAY:-ray}" || true)
[ -z "$RAY_BIN" ] || RAY_BIN=$(readlink -f "$RAY_BIN")  # absolute: nodes start from TEMP_ROOT
HEAD_IP=$SUBNET.1

log() { printf '[netns_cluster %s %s] %s\n' "$TAG" "$(date +%T)" "$*" >&2; }
die() { log "$*"; exit 1; }

ray_bin() {
  [ -x "$RAY_BIN" ] || die "ray not found (set RAY or PATH)"
  echo "$RAY_BIN"
}

ns_of() { echo "$TAG-$1"; }
ns_exists() { ip netns list | awk '{print $1}' | grep -qx "$1"; }

node_index() {  # index of node short name $1 in NODES
  local i
  for i in "${!NODES[@]}"; do [ "${NODES[i]}" = "$1" ] && { echo "$i"; return 0; }; done
  die "unknown node '$1' (nodes: ${NODES[*]})"
}

# Run a command inside node $1 with the cluster's environment.
in_node() {
  local node=$1 ray; shift
  ray=$(ray_bin)
  ip netns exec "$(ns_of "$node")" env PATH="$(dirname "$ray"):$PATH" \
    RAY_AUTH_MODE="$RAY_AUTH_MODE" RAY_ADDRESS="$HEAD_IP:$GCS_PORT" "$@"
}

ns_pids() { ip netns pids "$1" 2>/dev/null || true; }

kill_ns_procs() {  # $1 namespace, $2 grace seconds: SIGTERM, wait, then SIGKILL the rest
  local ns=$1 grace=$2 pids i
  ns_exists "$ns" || return 0
  pids=$(ns_pids "$ns")
  [ -z "$pids" ] && return 0
  if ((grace > 0)); then
    log "$ns: SIGTERM to $(echo $pids | wc -w) processes"
    kill -TERM $pids 2>/dev/null || true
    for ((i = 0; i < grace * 4; i++)); do
      pids=$(ns_pids "$ns")
      [ -z "$pids" ] && return 0
      sleep 0.25
    done
  fi
  # New processes can appear while we kill (a worker being spawned): repeat until none is left.
  for ((i = 0; i < 40; i++)); do
    pids=$(ns_pids "$ns")
    [ -z "$pids" ] && return 0
    log "$ns: SIGKILL to $(for p in $pids; do printf '%s(%s) ' "$p" "$(cat /proc/$p/comm 2>/dev/null)"; done)"
    kill -KILL $pids 2>/dev/null || true
    sleep 0.25
  done
  die "$ns: processes survive SIGKILL: $(ns_pids "$ns")"
}

down() {
  local i ns
  # Workers first, the head last (so the GCS does not log every worker as dead first).
  for ((i = ${#NODES[@]} - 1; i >= 0; i--)); do
    kill_ns_procs "$(ns_of "${NODES[i]}")" "$STOP_GRACE_S"
  done
  for ns in $(for n in "${NODES[@]}"; do ns_of "$n"; done) "$BRIDGE_NS"; do
    if ns_exists "$ns"; then ip netns del "$ns" && log "deleted namespace $ns"; fi
  done
  # The node logs stay under $TEMP_ROOT; `rm -rf $TEMP_ROOT` removes them.
}

net_up() {
  local i ns tries
  ip netns add "$BRIDGE_NS"
  ip -n "$BRIDGE_NS" link set lo up
  ip -n "$BRIDGE_NS" link add br0 type bridge
  ip -n "$BRIDGE_NS" link set br0 up
  for i in "${!NODES[@]}"; do
    ns=$(ns_of "${NODES[i]}")
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # The veth pair is made in the bridge namespace; its peer goes straight into the node's.
    ip -n "$BRIDGE_NS" link add "v$i" type veth peer name eth0 netns "$ns"
    ip -n "$BRIDGE_NS" link set "v$i" master br0
    ip -n "$BRIDGE_NS" link set "v$i" up
    ip -n "$ns" addr add "$SUBNET.$((i + 1))/24" dev eth0
    ip -n "$ns" link set eth0 up
  done
  for i in "${!NODES[@]}"; do  # wait for carrier (bridge ports forward at once: no STP)
    ns=$(ns_of "${NODES[i]}")
    for ((tries = 0; tries < 50; tries++)); do
      ip -n "$ns" -br link show eth0 | grep -qw UP && break
      sleep 0.1
    done
    ip -n "$ns" -br link show eth0 | grep -qw UP || die "$ns: eth0 is not up"
  done
}

start_node() {  # $1 node short name
  local node=$1 i ip res t0 common out
  i=$(node_index "$node")
  ip=$SUBNET.$((i + 1))
  res=${NODE_RESOURCES[i]:-}
  [ -n "$res" ] || res='{}'
  out=$TEMP_ROOT/$node.start.log
  common=(--node-ip-address "$ip" --num-cpus "${NODE_CPUS[i]:-1}" --resources "$res"
          --object-store-memory "$OBJECT_STORE_BYTES" --temp-dir "$TEMP_ROOT/$node"
          --disable-usage-stats)
  mkdir -p "$TEMP_ROOT"
  t0=$(date +%s%N)
  # The nodes' workers inherit this cwd: a neutral one keeps relative-path bugs visible.
  if ((i == 0)); then
    (cd "$TEMP_ROOT" && in_node "$node" "$(ray_bin)" start --head --port "$GCS_PORT" \
      --dashboard-host "$ip" --dashboard-port "$DASH_PORT" "${common[@]}") >"$out" 2>&1 \
      || { tail -20 "$out" >&2; return 1; }
  else
    (cd "$TEMP_ROOT" && in_node "$node" "$(ray_bin)" start --address "$HEAD_IP:$GCS_PORT" \
      "${common[@]}") >"$out" 2>&1 || { tail -20 "$out" >&2; return 1; }
  fi
  log "$node ($ip, $(ns_of "$node")): ray start took $((($(date +%s%N) - t0) / 1000000)) ms"
}

status() { in_node "${NODES[0]}" "$(ray_bin)" status --address "$HEAD_IP:$GCS_PORT"; }

up() {
  local node ns
  [ "$(id -u)" = 0 ] || die "needs root (ip netns)"
  command -v ip >/dev/null || die "needs iproute2 (ip)"
  ray_bin >/dev/null
  ((${#NODE_CPUS[@]} >= ${#NODES[@]})) || die "NODE_CPUS needs one entry per node"
  for ns in $(for n in "${NODES[@]}"; do ns_of "$n"; done) "$BRIDGE_NS"; do
    ns_exists "$ns" && die "namespace $ns exists; run 'TAG=$TAG $0 down' first"
  done
  trap 'log "up failed; cleaning up"; STOP_GRACE_S=0 down' ERR
  net_up
  for node in "${NODES[@]}"; do start_node "$node"; done
  trap - ERR
  status
  log "up: GCS $HEAD_IP:$GCS_PORT, dashboard http://$HEAD_IP:$DASH_PORT, logs $TEMP_ROOT"
  log "use: TAG=$TAG $0 exec ${NODES[0]} <cmd>"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  exec) [ $# -ge 3 ] || die "usage: $0 exec NODE CMD..."; node_index "$2" >/dev/null; shift
        node=$1; shift; in_node "$node" "$@" ;;
  pids) node_index "${2:?node}" >/dev/null; ns_pids "$(ns_of "$2")" ;;
  kill-node) node_index "${2:?node}" >/dev/null; kill_ns_procs "$(ns_of "$2")" 0 ;;
  start-node) node_index "${2:?node}" >/dev/null; start_node "$2" ;;
  *) sed -n '8,18p' "$0" >&2; exit 2 ;;
esac
