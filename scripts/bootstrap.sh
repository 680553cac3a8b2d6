#!/usr/bin/env bash
# Install what crab-ops needs on a fresh Debian 12 machine (as root, non-interactive), idempotent and quiet
# when everything is present: Debian packages, the project venv (make venv), a running Docker engine.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
export DEBIAN_FRONTEND=noninteractive

# package -> a command it provides (empty: check with dpkg)
declare -A pkgs=(
  [docker.io]=dockerd [debootstrap]=debootstrap [zstd]=zstd [sqlite3]=sqlite3
  [openssh-client]=ssh [python3-venv]="" [make]=make
)
missing=()
for p in "${!pkgs[@]}"; do
  cmd="${pkgs[$p]}"
  if [ -n "$cmd" ]; then
    command -v "$cmd" >/dev/null 2>&1 && continue
  else
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' && continue
  fi
  missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: missing packages ${missing[*]}; run this script as root to install them." >&2
    exit 1
  fi
  echo "bootstrap: installing ${missing[*]}" >&2
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

make --no-print-directory -s venv
bash scripts/ensure-docker.sh
