#!/usr/bin/env bash
# Makes sure PostgreSQL and RabbitMQ run on this machine and hold what Chiffon's tests and
# production mode need. Idempotent: starts what is stopped, installs what is missing (from
# Debian's packages, when run as root), waits until both answer, then creates the
# `chiffon` database and the `chiffon` vhost.
#
#   scripts/services.sh            # start/install both
#   CHIFFON_SKIP_SERVICES=1 ...    # do nothing (services managed elsewhere)
set -euo pipefail

[ "${CHIFFON_SKIP_SERVICES:-}" = "1" ] && { echo "services: skipped (CHIFFON_SKIP_SERVICES=1)"; exit 0; }

log() { printf 'services: %s\n' "$*"; }
die() { printf 'services: error: %s\n' "$*" >&2; exit 1; }

PG_PORT=${CHIFFON_PG_PORT:-5432}
AMQP_PORT=${CHIFFON_AMQP_PORT:-5672}
APT_UPDATED=

as_root() {
  [ "$(id -u)" = 0 ] || die "$1 is missing and installing it needs root: install it, or run this script as root"
}

apt_install() {
  as_root "$*"
  if [ -z "$APT_UPDATED" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_UPDATED=1
  fi
  log "installing $* from Debian's packages"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # name port seconds
  local i
  for ((i = 0; i < $3 * 4; i++)); do
    port_open "$2" && return 0
    sleep 0.25
  done
  die "$1 did not answer on 127.0.0.1:$2 within $3 s"
}

as_postgres() {
  if [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1; then
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

# ---- PostgreSQL ----
if ! port_open "$PG_PORT"; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    apt_install postgresql postgresql-client
  fi
  ver=$(ls /etc/postgresql | sort -V | tail -n 1)
  log "starting PostgreSQL $ver"
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
  wait_port PostgreSQL "$PG_PORT" 60
fi
command -v psql >/dev/null || apt_install postgresql-client
# The tests connect as postgres/postgres over TCP: make that work on a fresh install
# (scram auth by default) without touching a machine where it already works (trust).
if ! PGPASSWORD=postgres psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -tAc 'select 1' >/dev/null 2>&1; then
  log "setting the postgres role's password for local TCP connections"
  as_postgres psql -p "$PG_PORT" -d postgres -qc "ALTER ROLE postgres PASSWORD 'postgres'" >/dev/null \
    || die "cannot reach PostgreSQL as postgres on 127.0.0.1:$PG_PORT"
fi
PSQL=(env PGPASSWORD=postgres psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -tAq)
if [ "$("${PSQL[@]}" -c "select 1 from pg_database where datname='chiffon'")" != 1 ]; then
  "${PSQL[@]}" -c "CREATE DATABASE chiffon" && log "created database chiffon"
fi
log "PostgreSQL ready on 127.0.0.1:$PG_PORT"

# ---- RabbitMQ broker users (SECURITY.md) ----
# One broker user per role, with permissions on vhost `chiffon` limited to what the role
# needs; RabbitMQ then vouches for each message's publisher (the user_id property). The
# passwords are generated once and kept in $BROKER_USERS_FILE (mode 600) as ready-made
# AMQP URLs: CHIFFON_BROKER_{ORCHESTRATOR,INFRA_AGENT,DESKTOP_AGENT,PYTHON_AGENT,FRONTEND}_URL.
BROKER_USERS_FILE=${CHIFFON_BROKER_USERS_FILE:-"$(cd "$(dirname "$0")/.." && pwd)/.chiffon/broker-users.env"}
broker_users() {
  local host re_host
  host=$(hostname)
  re_host=$(printf '%s' "$host" | sed 's/[.[\*^$()+?{|]/\\&/g')
  mkdir -p "$(dirname "$BROKER_USERS_FILE")"
  if [ ! -s "$BROKER_USERS_FILE" ]; then
    (
      umask 077
      for role in ORCHESTRATOR INFRA_AGENT DESKTOP_AGENT FRONTEND; do
        echo "CHIFFON_BROKER_${role}_PASSWORD=$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 24)"
      done >"$BROKER_USERS_FILE.tmp"
      mv "$BROKER_USERS_FILE.tmp" "$BROKER_USERS_FILE"
    )
  fi
  # shellcheck disable=SC1090
  . "$BROKER_USERS_FILE"
  # A role added since the file was written gets its password now.
  for role in ORCHESTRATOR INFRA_AGENT DESKTOP_AGENT PYTHON_AGENT FRONTEND; do
    var="CHIFFON_BROKER_${role}_PASSWORD"
    [ -n "${!var:-}" ] || printf -v "$var" '%s' "$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 24)"
  done
  # user password configure write read
  set_user() {
    if rabbitmqctl -q list_users 2>/dev/null | awk '{print $1}' | grep -qx "$1"; then
      rabbitmqctl -q change_password "$1" "$2" >/dev/null
    else
      rabbitmqctl -q add_user "$1" "$2" >/dev/null && log "created broker user $1"
    fi
    rabbitmqctl -q set_permissions -p chiffon "$1" "$3" "$4" "$5" >/dev/null
  }
  # The orchestrator declares the topology and uses all of it.
  set_user chiffon-orchestrator "$CHIFFON_BROKER_ORCHESTRATOR_PASSWORD" '.*' '.*' '.*'
  # An agent declares and reads its own queue, the work exchange (to bind and to publish
  # results), the dead-letter queue its queue names, and a private control queue.
  local agent_conf='^(chiffon\.(work|control|dead)|amq\.gen-.*|QUEUE)$'
  local agent_write='^(chiffon\.work|amq\.default|amq\.gen-.*|QUEUE)$'
  local agent_read='^(chiffon\.(work|control)|amq\.gen-.*|QUEUE)$'
  local q
  q='agent\.infrastructure'
  set_user chiffon-agent-infra "$CHIFFON_BROKER_INFRA_AGENT_PASSWORD" \
    "${agent_conf/QUEUE/$q}" "${agent_write/QUEUE/$q}" "${agent_read/QUEUE/$q}"
  q="agent\\.desktop\\.$re_host"
  set_user chiffon-agent-desktop "$CHIFFON_BROKER_DESKTOP_AGENT_PASSWORD" \
    "${agent_conf/QUEUE/$q}" "${agent_write/QUEUE/$q}" "${agent_read/QUEUE/$q}"
  # The example agent in another language (examples/python-agent, PROTOCOL.md): agent type
  # `python`, the same rights as the infrastructure agent on its own queue.
  q='agent\.python'
  set_user chiffon-agent-python "$CHIFFON_BROKER_PYTHON_AGENT_PASSWORD" \
    "${agent_conf/QUEUE/$q}" "${agent_write/QUEUE/$q}" "${agent_read/QUEUE/$q}"
  # A frontend only publishes user_request messages to the work exchange.
  set_user chiffon-frontend "$CHIFFON_BROKER_FRONTEND_PASSWORD" '^$' '^chiffon\.work$' '^$'
  {
    echo "# Generated by scripts/services.sh: broker users of vhost chiffon (SECURITY.md)."
    for role in ORCHESTRATOR INFRA_AGENT DESKTOP_AGENT PYTHON_AGENT FRONTEND; do
      var="CHIFFON_BROKER_${role}_PASSWORD"
      echo "$var=${!var}"
    done
    echo "CHIFFON_BROKER_ORCHESTRATOR_URL=amqp://chiffon-orchestrator:$CHIFFON_BROKER_ORCHESTRATOR_PASSWORD@127.0.0.1:$AMQP_PORT/chiffon"
    echo "CHIFFON_BROKER_INFRA_AGENT_URL=amqp://chiffon-agent-infra:$CHIFFON_BROKER_INFRA_AGENT_PASSWORD@127.0.0.1:$AMQP_PORT/chiffon"
    echo "CHIFFON_BROKER_DESKTOP_AGENT_URL=amqp://chiffon-agent-desktop:$CHIFFON_BROKER_DESKTOP_AGENT_PASSWORD@127.0.0.1:$AMQP_PORT/chiffon"
    echo "CHIFFON_BROKER_PYTHON_AGENT_URL=amqp://chiffon-agent-python:$CHIFFON_BROKER_PYTHON_AGENT_PASSWORD@127.0.0.1:$AMQP_PORT/chiffon"
    echo "CHIFFON_BROKER_FRONTEND_URL=amqp://chiffon-frontend:$CHIFFON_BROKER_FRONTEND_PASSWORD@127.0.0.1:$AMQP_PORT/chiffon"
  } >"$BROKER_USERS_FILE.tmp"
  chmod 600 "$BROKER_USERS_FILE.tmp"
  mv "$BROKER_USERS_FILE.tmp" "$BROKER_USERS_FILE"
  log "broker users ready (URLs in $BROKER_USERS_FILE)"
}

# ---- RabbitMQ ----
if ! port_open "$AMQP_PORT"; then
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  log "starting RabbitMQ"
  rabbitmq-server -detached || true
  wait_port RabbitMQ "$AMQP_PORT" 120
fi
if command -v rabbitmqctl >/dev/null; then
  for _ in $(seq 1 60); do rabbitmqctl -q await_startup >/dev/null 2>&1 && break; sleep 1; done
  if ! rabbitmqctl -q list_vhosts 2>/dev/null | grep -qx chiffon; then
    rabbitmqctl -q add_vhost chiffon >/dev/null && log "created vhost chiffon"
  fi
  rabbitmqctl -q set_permissions -p chiffon guest '.*' '.*' '.*' >/dev/null
  broker_users
fi
log "RabbitMQ ready on 127.0.0.1:$AMQP_PORT"
