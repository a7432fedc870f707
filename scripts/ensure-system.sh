#!/usr/bin/env bash
# Make sure the system tools are present and a Docker engine answers: install what is missing
# from Debian's packages (Debian + root only), then start dockerd when it is not running.
#   docker.io    the engine that runs sandboxes
#   debootstrap  builds the sandbox base image offline (sandboxes/docker/build.sh)
#   jq           used by the README's curl walk-through (and its test)
#   npm          installs the web page's pinned assets (critique_local/ui/package-lock.json)
#   chromium     the real browser the web page's tests drive (tests/e2e/test_web_ui.py, bench/ui_bench.py)
#   systemd      its systemd-analyze checks deploy/critique-local.service (tests/test_deploy.py)
set -euo pipefail

missing=()
command -v dockerd >/dev/null 2>&1 || docker info >/dev/null 2>&1 || missing+=(docker.io iptables)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v jq >/dev/null 2>&1 || missing+=(jq)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && [ -f /etc/debian_version ]; then
    echo "==> installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "Missing: ${missing[*]}. Install them (Debian: apt-get install ${missing[*]}) and re-run." >&2
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
