#!/usr/bin/env bash
# Build the CPU image with no registry to pull a base from, then run a short toy GRPO job in it
# with no network at all.
#
#   1. docker.io and mmdebstrap from Debian, if missing; dockerd started if none answers (and
#      stopped at the end only when this script started it);
#   2. the base: a Debian bookworm minbase with python3, python3-venv and ca-certificates,
#      bootstrapped by mmdebstrap and imported as $BASE_TAG (once; reused when present). The
#      host's CA bundle goes into it, so pip inside the build trusts what the host trusts;
#   3. the image: docker/Dockerfile on that base, built with --network host; torch's CPU wheel
#      comes from the host's pip (copied into docker/wheels/) when it has one, else from the
#      PyTorch CPU index;
#   4. the check: `physarum run configs/toy_grpo.yaml` for $STEPS steps, `--network none`.
#
# Usage: docker/build_local.sh          (as root, from anywhere)
# Env:   IMAGE (physarum:cpu), BASE_TAG (physarum-base:bookworm), STEPS (3),
#        DOCKERD_ARGS (extra dockerd flags, e.g. "--storage-driver vfs")
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${IMAGE:-physarum:cpu}"
BASE_TAG="${BASE_TAG:-physarum-base:bookworm}"
STEPS="${STEPS:-3}"
WORK="$(mktemp -d /tmp/physarum-docker.XXXXXX)"
DOCKERD_PID=""

say() { printf '[build_local %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[build_local] ERROR: %s\n' "$*" >&2; exit 1; }

cleanup() {
  rm -rf "$WORK"
  if [ -n "$DOCKERD_PID" ]; then  # only the dockerd this script started
    say "stopping the dockerd this script started (pid $DOCKERD_PID)"
    kill "$DOCKERD_PID" 2>/dev/null || true
    wait "$DOCKERD_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT

[ "$(id -u)" = "0" ] || die "run as root: it installs packages, starts dockerd and bootstraps a rootfs"

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]} with apt-get"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  say "no Docker daemon answers; starting dockerd (log: $WORK/dockerd.log)"
  # shellcheck disable=SC2086  # DOCKERD_ARGS is a list of flags
  dockerd ${DOCKERD_ARGS:-} >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -20 "$WORK/dockerd.log" >&2; die "dockerd exited"; }
    sleep 1
  done
  docker info >/dev/null 2>&1 || die "dockerd did not answer within 60 s; see $WORK/dockerd.log"
fi

if ! docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
  say "bootstrapping $BASE_TAG with mmdebstrap (Debian bookworm minbase + python3)"
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    --customize-hook='cp /etc/ssl/certs/ca-certificates.crt "$1/etc/ssl/certs/ca-certificates.crt"' \
    bookworm "$WORK/rootfs.tar"
  # Debian's pip (23.0) reads certifi's bundle, not the system one: point it at the host's.
  docker import \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["/bin/bash"]' \
    "$WORK/rootfs.tar" "$BASE_TAG" >/dev/null
fi

torch_index=https://download.pytorch.org/whl/cpu
host_pip=(python3 -m pip)
[ -x "$REPO/.venv/bin/pip" ] && host_pip=("$REPO/.venv/bin/pip")
if "${host_pip[@]}" download -q --no-deps -d "$REPO/docker/wheels" "torch==2.13.0+cpu" \
  >/dev/null 2>&1; then
  say "torch 2.13.0+cpu wheel from the host's pip -> docker/wheels/; the rest from PyPI"
  torch_index=https://pypi.org/simple
fi

say "building $IMAGE on $BASE_TAG"
start=$(date +%s)
docker build --network host -f "$REPO/docker/Dockerfile" \
  --build-arg "BASE=$BASE_TAG" --build-arg "TORCH_INDEX=$torch_index" \
  -t "$IMAGE" "$REPO"
build_s=$(( $(date +%s) - start ))
size_mb=$(( $(docker image inspect -f '{{.Size}}' "$IMAGE") / 1000000 ))
say "built $IMAGE in ${build_s} s; image size ${size_mb} MB"

say "running physarum run configs/toy_grpo.yaml for $STEPS steps with --network none"
start=$(date +%s)
docker run --rm --network none --shm-size=1g "$IMAGE" \
  run configs/toy_grpo.yaml --no-dashboard \
  --set "trainer.steps=$STEPS" --set rollout.eval.n_prompts=16
say "job finished in $(( $(date +%s) - start )) s; build ${build_s} s, image ${size_mb} MB"
