#!/usr/bin/env bash
# The main job on the local lab: site.yml over SSH (twice: the second run must change nothing), then a backup
# now, a restore drill of the newest backup, and every health check. Run through `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" ANSIBLE_CONFIG="$PWD/ansible.cfg"
log_dir=.lab/demo
mkdir -p "$log_dir"

run() { # run NAME PLAYBOOK [ARGS...]: run a playbook, keep its output, fail loudly
  local name=$1; shift
  echo "==> ansible-playbook $*"
  if ! ansible-playbook "$@" 2>&1 | tee "$log_dir/$name.log"; then
    echo "FAILED: ansible-playbook $* (full output in $log_dir/$name.log)" >&2
    exit 1
  fi
}

run site-1 site.yml
touch .lab/site-applied  # tests/integration/site.py resets the lab before its dry run
run site-2 site.yml
changed=$(awk '/PLAY RECAP/{r=1;next} r && /changed=/{sub(/.*changed=/,""); sub(/ .*/,""); s+=$0} END{print s+0}' \
  "$log_dir/site-2.log")
if [ "$changed" != 0 ]; then
  echo "FAILED: the second site.yml run reported changed=$changed; it must be 0 (see $log_dir/site-2.log)" >&2
  exit 1
fi
echo "==> second run: changed=0"
run backup-now playbooks/backup-now.yml
run restore-drill playbooks/restore-drill.yml
run health playbooks/health.yml
echo "==> demo done: site applied and idempotent, backup taken, restore drill passed, health checks green"
