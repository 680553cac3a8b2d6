#!/usr/bin/env bash
# The crab-ops lab: real hosts (containers) for the roles, tests and Molecule.
#   lab/lab.sh images   build the crab-lab/* images (cached; rebuilt only when their context changed)
#   lab/lab.sh up       images + S3 + cloud1/edge1/edge2 + compose project + seeded DB; writes .lab/ready
#   lab/lab.sh status   what is up
#   lab/lab.sh down     remove everything `up` made (keeps the image cache)
#   lab/lab.sh purge    down + remove the crab-lab/* images
# Contracts (names, ports, paths): docs/DESIGN.md. Every port is published on 127.0.0.1 only.
set -euo pipefail
umask 022

REPO="$(cd "$(dirname "$0")/.." && pwd)"
LAB="$REPO/lab"
STATE="$REPO/.lab"
VENV_BIN="$REPO/.venv/bin"
NET=crab-lab-net
LABEL=crab-lab=1
SEED_MB="${CRAB_LAB_SEED_MB:-100}"
MIRROR="${CRAB_LAB_MIRROR:-http://deb.debian.org/debian}"
# SeaweedFS: every listening port pinned on 127.0.0.1 (defaults would put the volume gRPC port on 18080).
S3_PORT=8333
WEED_MASTER_PORT=9333
WEED_VOLUME_PORT=9340
WEED_FILER_PORT=9341
HOSTS=(cloud1 edge1 edge2)
declare -A SSH_PORT=([cloud1]=2221 [edge1]=2222 [edge2]=2223)

log() { printf 'lab: %s\n' "$*" >&2; }
die() {
  printf 'lab: ERROR: %s\n' "$*" >&2
  exit 1
}
now() { date +%s.%N; }

# ---------------------------------------------------------------------------------------------- images
image_exists() { docker image inspect "$1" >/dev/null 2>&1; }
image_label() { docker image inspect -f "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null || true; }

build_base() {
  local tag=crab-lab/base:bookworm
  if image_exists "$tag"; then
    return 0
  fi
  command -v debootstrap >/dev/null || die "debootstrap is missing: run scripts/bootstrap.sh first."
  local root="$STATE/cache/rootfs"
  rm -rf "$root"
  mkdir -p "$STATE/cache"
  log "debootstrap --variant=minbase bookworm (once; cached as $tag)"
  debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$STATE/cache/debootstrap.log" 2>&1 ||
    die "debootstrap failed; see $STATE/cache/debootstrap.log."
  cat >"$root/etc/apt/sources.list" <<SRC
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SRC
  # Containers: no recommends, no docs, no apt caches.
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' >"$root/etc/apt/apt.conf.d/90lab"
  printf 'path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\npath-exclude /usr/share/info/*\n' \
    >"$root/etc/dpkg/dpkg.cfg.d/90lab-nodoc"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import -c 'CMD ["/bin/bash"]' -c 'ENV LANG=C.UTF-8' - "$tag" >/dev/null
  rm -rf "$root"
}

# Stage an image's build context in .lab/build/<name>, hash it (content + parent image id), and build only when
# the hash differs from the label on the existing image.
build_image() {
  local name="$1" tag="$2" parent="$3"
  local ctx="$STATE/build/$name"
  rm -rf "$ctx"
  mkdir -p "$ctx"
  cp -a "$LAB/images/$name/." "$ctx/"
  case "$name" in
  cloud)
    cp "$(command -v docker)" "$ctx/docker"
    # .venv/bin/docker-compose is a Python wrapper; the plugin is the static binary it runs.
    cp "$("$VENV_BIN/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')" \
      "$ctx/docker-compose"
    ;;
  edge)
    cp -a "$LAB/edge-server/." "$ctx/"
    ;;
  esac
  local parent_id hash
  parent_id="$(docker image inspect -f '{{.Id}}' "$parent")"
  hash="$( (
    cd "$ctx"
    echo "$parent_id"
    find . -type f -print0 | sort -z | xargs -0 sha256sum
    find . -type f -perm -u+x | sort
  ) | sha256sum | cut -c1-64)"
  if [ "$(image_label "$tag" crab.lab.context)" = "$hash" ]; then
    rm -rf "$ctx"
    return 0
  fi
  log "building $tag"
  docker build --network host --pull=false --force-rm -q --label "crab.lab.context=$hash" -t "$tag" "$ctx" \
    >"$STATE/build/$name.log" 2>&1 || {
    tail -n 30 "$STATE/build/$name.log" >&2
    die "docker build of $tag failed; see $STATE/build/$name.log."
  }
  rm -rf "$ctx"
}

cmd_images() {
  bash "$REPO/scripts/ensure-docker.sh"
  mkdir -p "$STATE/build"
  [ -x "$VENV_BIN/docker-compose" ] || die "$VENV_BIN/docker-compose is missing: run 'make venv' first."
  build_base
  build_image node crab-lab/node crab-lab/base:bookworm
  build_image cloud crab-lab/cloud crab-lab/node
  build_image edge crab-lab/edge crab-lab/node
  build_image postgres crab-lab/postgres:15 crab-lab/base:bookworm
  build_image cloud-api crab-lab/cloud-api crab-lab/base:bookworm
  # Old versions of the lab's own images (label crab.lab.context) that nothing uses any more.
  docker image prune -f --filter label=crab.lab.context >/dev/null
}

# ---------------------------------------------------------------------------------------------- secrets, ssh
secret() {
  # secret <name> <python expression producing the value>: generate once, 0600
  local f="$STATE/secrets/$1"
  [ -s "$f" ] && return 0
  (umask 077 && python3 -c "import secrets, string; print($2)" >"$f.tmp" && mv "$f.tmp" "$f")
}

ensure_secrets() {
  mkdir -p "$STATE/secrets" "$STATE/ssh" "$STATE/s3"
  chmod 0700 "$STATE/secrets" "$STATE/ssh" "$STATE/s3"
  secret pg_password 'secrets.token_urlsafe(24)'
  secret s3_access_key "''.join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(20))"
  secret s3_secret_key 'secrets.token_urlsafe(30)'
  if [ ! -s "$STATE/s3/kek" ]; then
    (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' >"$STATE/s3/kek")
  fi
  if [ ! -s "$STATE/ssh/id_ed25519" ]; then
    ssh-keygen -q -t ed25519 -N '' -C crab-lab -f "$STATE/ssh/id_ed25519"
  fi
}

# ---------------------------------------------------------------------------------------------- S3
weed_running() { [ -s "$STATE/s3/weed.pid" ] && kill -0 "$(cat "$STATE/s3/weed.pid")" 2>/dev/null; }

ensure_s3() {
  if ! weed_running; then
    mkdir -p "$STATE/s3/data"
    (umask 077 && python3 - "$STATE/secrets" "$STATE/s3/identities.json" <<'PY'
import json, pathlib, sys
secrets = pathlib.Path(sys.argv[1])
identity = {
    "name": "crab-lab",
    "credentials": [{
        "accessKey": (secrets / "s3_access_key").read_text().strip(),
        "secretKey": (secrets / "s3_secret_key").read_text().strip(),
    }],
    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
}
pathlib.Path(sys.argv[2]).write_text(json.dumps({"identities": [identity]}, indent=1))
PY
    )
    log "starting SeaweedFS S3 on 127.0.0.1:$S3_PORT"
    (
      cd "$STATE/s3"
      WEED_S3_SSE_KEK="$(cat "$STATE/s3/kek")" nohup setsid "$VENV_BIN/weed" server \
        -ip 127.0.0.1 -ip.bind 127.0.0.1 -dir "$STATE/s3/data" \
        -master.port "$WEED_MASTER_PORT" -volume.port "$WEED_VOLUME_PORT" -filer.port "$WEED_FILER_PORT" \
        -master.volumeSizeLimitMB 1024 -volume.max 0 \
        -master.telemetry=false -s3 -s3.port "$S3_PORT" -s3.port.iceberg=0 -s3.port.lance=0 -s3.config "$STATE/s3/identities.json" \
        >>"$STATE/s3/weed.log" 2>&1 </dev/null 9>&- &
      echo $! >"$STATE/s3/weed.pid"
    )
  fi
  "$VENV_BIN/python" "$LAB/lab_s3.py" "http://127.0.0.1:$S3_PORT" "$STATE/secrets" crab-backups 90 ||
    die "S3 is not serving; see $STATE/s3/weed.log."
}

# ---------------------------------------------------------------------------------------------- containers
# ensure_container <name> <image> <docker run args...>: keep a running container on the current image, else recreate
ensure_container() {
  local name="$1" image="$2"
  shift 2
  local want have running
  want="$(docker image inspect -f '{{.Id}}' "$image")"
  have="$(docker container inspect -f '{{.Image}}' "$name" 2>/dev/null || true)"
  running="$(docker container inspect -f '{{.State.Running}}' "$name" 2>/dev/null || true)"
  if [ "$have" = "$want" ] && [ "$running" = true ]; then
    return 0
  fi
  if [ -n "$have" ]; then
    log "recreating $name (image changed or container stopped)"
    docker rm -f "$name" >/dev/null
  fi
  docker run -d --name "$name" --label "$LABEL" "$@" "$image" >/dev/null
}

ensure_hosts() {
  local pub
  pub="$(cat "$STATE/ssh/id_ed25519.pub")"
  docker network inspect "$NET" >/dev/null 2>&1 || docker network create --label "$LABEL" "$NET" >/dev/null
  # /mnt/crab-full: a tiny tmpfs where the backup tests provoke "disk full" (containers cannot mount one).
  ensure_container crab-lab-cloud1 crab-lab/cloud --network host \
    -v /var/run/docker.sock:/var/run/docker.sock --tmpfs /mnt/crab-full:rw,size=8m,mode=0700 \
    -e LAB_SSH_PORT="${SSH_PORT[cloud1]}" -e LAB_SSH_LISTEN=127.0.0.1 -e LAB_AUTHORIZED_KEY="$pub"
  local h
  for h in edge1 edge2; do
    ensure_container "crab-lab-$h" crab-lab/edge --hostname "$h" --network "$NET" \
      -p "127.0.0.1:${SSH_PORT[$h]}:22" -e LAB_AUTHORIZED_KEY="$pub"
  done
}

ensure_compose() {
  local c=crab-lab-cloud1
  docker exec "$c" mkdir -p /opt/crab
  # Copied once: afterwards the file belongs to the roles (compose_logging, healthcheck edit it).
  if ! docker exec "$c" test -f /opt/crab/docker-compose.yml; then
    docker cp "$LAB/cloud/docker-compose.yml" "$c:/opt/crab/docker-compose.yml"
    docker exec "$c" chown root:root /opt/crab/docker-compose.yml
  fi
  if ! docker exec "$c" test -s /opt/crab/.env; then
    printf 'POSTGRES_PASSWORD=%s\n' "$(cat "$STATE/secrets/pg_password")" |
      docker exec -i "$c" sh -c 'umask 077; cat >/opt/crab/.env.tmp && mv /opt/crab/.env.tmp /opt/crab/.env'
  fi
  docker exec "$c" docker compose --project-directory /opt/crab -f /opt/crab/docker-compose.yml \
    up -d --pull never --quiet-pull >"$STATE/compose-up.log" 2>&1 || {
    cat "$STATE/compose-up.log" >&2
    die "docker compose up inside $c failed."
  }
  local i
  for i in $(seq 1 120); do
    if docker exec crab-postgres pg_isready -q -h 127.0.0.1 -U crab -d crab 2>/dev/null; then
      break
    fi
    if [ "$i" = 120 ] || [ "$(docker container inspect -f '{{.State.Running}}' crab-postgres 2>/dev/null)" != true ]; then
      docker logs --tail 20 crab-postgres >&2 || true
      die "crab-postgres is not accepting connections; see 'docker logs crab-postgres'."
    fi
    sleep 0.5
  done
  "$VENV_BIN/python" "$LAB/seed/seed_pos.py" --password-file "$STATE/secrets/pg_password" --mb "$SEED_MB" >&2
}

ssh_lab() {
  local port="$1"
  shift
  ssh -F /dev/null -i "$STATE/ssh/id_ed25519" -o IdentitiesOnly=yes -o BatchMode=yes -o ConnectTimeout=5 \
    -o UserKnownHostsFile="$STATE/ssh/known_hosts" -o StrictHostKeyChecking=yes -o LogLevel=ERROR \
    -p "$port" root@127.0.0.1 "$@"
}

ensure_ssh() {
  local h key tmp="$STATE/ssh/known_hosts.tmp" i
  : >"$tmp"
  for h in "${HOSTS[@]}"; do
    for i in $(seq 1 50); do
      key="$(docker exec "crab-lab-$h" cat /etc/ssh/ssh_host_ed25519_key.pub 2>/dev/null | cut -d' ' -f1,2)" || true
      [ -n "$key" ] && break
      sleep 0.2
    done
    [ -n "$key" ] || die "crab-lab-$h has no SSH host key; see 'docker logs crab-lab-$h'."
    echo "[127.0.0.1]:${SSH_PORT[$h]} $key" >>"$tmp"
  done
  mv "$tmp" "$STATE/ssh/known_hosts"
  for h in "${HOSTS[@]}"; do
    for i in $(seq 1 50); do
      ssh_lab "${SSH_PORT[$h]}" 'python3 -c "import sys; sys.exit(0)"' 2>/dev/null && continue 2
      sleep 0.2
    done
    ssh_lab "${SSH_PORT[$h]}" true || die "ssh to $h (127.0.0.1:${SSH_PORT[$h]}) fails with the lab key."
  done
}

cmd_up() {
  local t0
  t0="$(now)"
  cmd_images
  if [ ! -s "$STATE/secrets/pg_password" ] && [ -n "$(docker ps -aq --filter "label=$LABEL")$(docker volume ls -q \
    --filter label=com.docker.compose.project=crab)" ]; then
    # Containers and volumes of a lab whose secrets are gone (another checkout, or a CI clone on a used machine):
    # their keys and passwords are unknown here, so start from nothing rather than fail on a stale password.
    log "removing a stale lab whose secrets are not in $STATE"
    remove_lab_containers
  fi
  ensure_secrets
  ensure_s3
  ensure_hosts
  ensure_compose
  ensure_ssh
  docker image prune -f --filter label=crab.lab.context >/dev/null
  touch "$STATE/ready"
  log "up ($(python3 -c "print(f'{$(now) - $t0:.1f}')")s): cloud1 127.0.0.1:2221, edge1 :2222, edge2 :2223, S3 :$S3_PORT, crab-cloud :18080"
}

# ---------------------------------------------------------------------------------------------- status, down
cmd_status() {
  echo "ready: $([ -f "$STATE/ready" ] && echo yes || echo no)"
  if weed_running; then
    echo "s3: SeaweedFS pid $(cat "$STATE/s3/weed.pid") on 127.0.0.1:$S3_PORT"
  else
    echo "s3: down"
  fi
  echo "containers:"
  docker ps -a --filter "label=$LABEL" --format '  {{.Names}}\t{{.Status}}\t{{.Ports}}'
  docker ps -a --filter label=com.docker.compose.project=crab --format '  {{.Names}}\t{{.Status}}\t{{.Ports}}'
}

# remove_all <remove command...> -- <list command...>: run the remove command on every id the list command prints
remove_all() {
  local remove=() ids
  while [ "$1" != -- ]; do
    remove+=("$1")
    shift
  done
  shift
  mapfile -t ids < <("$@")
  if [ "${#ids[@]}" -gt 0 ]; then
    "${remove[@]}" "${ids[@]}" >/dev/null
  fi
}

# The lab's containers, compose project, volumes and networks, whichever checkout made them.
remove_lab_containers() {
  if [ "$(docker container inspect -f '{{.State.Running}}' crab-lab-cloud1 2>/dev/null)" = true ]; then
    docker exec crab-lab-cloud1 docker compose -p crab down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  # Whatever compose left (cloud1 gone or compose failed): the project's containers, volumes, networks.
  remove_all docker rm -f -- docker ps -aq --filter label=com.docker.compose.project=crab
  remove_all docker volume rm -- docker volume ls -q --filter label=com.docker.compose.project=crab
  remove_all docker network rm -- docker network ls -q --filter label=com.docker.compose.project=crab
  remove_all docker rm -f -- docker ps -aq --filter "label=$LABEL"
  docker network rm "$NET" >/dev/null 2>&1 || true
}

cmd_down() {
  rm -f "$STATE/ready"
  remove_lab_containers
  if weed_running; then
    local pid
    pid="$(cat "$STATE/s3/weed.pid")"
    kill -TERM "$pid"
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -rf "$STATE/ssh" "$STATE/secrets" "$STATE/s3" "$STATE/build" "$STATE/compose-up.log" "$STATE/site-applied"
  log "down (image cache kept; 'lab/lab.sh purge' removes the crab-lab images)"
}

cmd_purge() {
  cmd_down
  remove_all docker image rm -f -- docker image ls -q --filter 'reference=crab-lab/*'
  rm -rf "$STATE/cache"
  log "purged crab-lab images"
}

# One lab operation at a time: test sessions of several engineers may call `up` together.
lock() {
  mkdir -p "$STATE"
  exec 9>"$STATE/.lock"
  flock -w 600 9 || die "another lab.sh holds $STATE/.lock for more than 600s."
}

case "${1:-}" in
images) lock && cmd_images ;;
up) lock && cmd_up ;;
status) cmd_status ;;
down) lock && cmd_down ;;
purge) lock && cmd_purge ;;
*)
  sed -n '2,8p' "$0" >&2
  exit 2
  ;;
esac
