#!/usr/bin/env bash
# Make sure a Docker engine answers: use a running one, else install Debian's docker.io (if missing) and start
# dockerd in the background, logging to .lab/dockerd.log. Waits a bounded time; exits non-zero with a clear
# message when the engine does not come up.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
wait_s="${CRAB_DOCKER_WAIT_S:-60}"

if docker info >/dev/null 2>&1; then
  exit 0
fi

if ! command -v dockerd >/dev/null 2>&1; then
  echo "ensure-docker: dockerd missing, installing Debian docker.io" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq docker.io >/dev/null
fi

mkdir -p "$repo/.lab"
log="$repo/.lab/dockerd.log"
if ! pgrep -x dockerd >/dev/null 2>&1; then
  echo "ensure-docker: starting dockerd (log: $log)" >&2
  nohup dockerd >>"$log" 2>&1 </dev/null &
fi

for _ in $(seq 1 "$wait_s"); do
  if docker info >/dev/null 2>&1; then
    exit 0
  fi
  sleep 1
done
echo "ensure-docker: the Docker engine did not answer within ${wait_s}s; see $log (last lines below) and fix dockerd before retrying." >&2
tail -n 20 "$log" >&2 || true
exit 1
