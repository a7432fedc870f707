#!/usr/bin/env bash
# Make sure a Docker engine answers: install Debian's docker.io when missing
# (Debian + root only), then start dockerd when it is not running.
set -euo pipefail

if docker info >/dev/null 2>&1; then exit 0; fi

if ! command -v dockerd >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && [ -f /etc/debian_version ]; then
    echo "==> installing the Docker engine (docker.io) and debootstrap with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq docker.io debootstrap iptables >/dev/null
  else
    echo "No Docker engine found. Install one (e.g. 'apt-get install docker.io' as root), start it, and re-run." >&2
    exit 1
  fi
fi

if ! docker info >/dev/null 2>&1; then
  echo "==> starting dockerd (log: /var/log/critique-dockerd.log)"
  nohup dockerd >/var/log/critique-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && exit 0
    sleep 0.5
  done
  echo "dockerd did not come up; see /var/log/critique-dockerd.log" >&2
  exit 1
fi
