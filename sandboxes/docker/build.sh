#!/usr/bin/env bash
# Build the sandbox image offline.
#   1. the pinned opencode-ai from the npm registry (its self-contained binary);
#   2. a Debian base image: debootstrap a rootfs from the machine's own apt
#      mirror and `docker import` it (no image registry needed). Set
#      SANDBOX_BASE_IMAGE=debian:bookworm-slim-like-image to use a pulled image
#      instead (it must already provide the same packages);
#   3. `docker build` this folder on top.
# Re-running reuses what exists: it rebuilds only when an input changed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
OPENCODE_VERSION="${OPENCODE_VERSION:-$(cat "$here/OPENCODE_VERSION")}"
IMAGE="${SANDBOX_IMAGE:-critique-local/sandbox:latest}"
BASE="${SANDBOX_BASE_IMAGE:-critique-local/base:bookworm}"
PACKAGES="git,ca-certificates,python3,python3-pytest,ripgrep,procps,less"
cache="$root/.cache"

mkdir -p "$cache"

# 1. opencode
oc_dir="$cache/opencode-$OPENCODE_VERSION"
oc_bin="$oc_dir/opencode"
if [ ! -x "$oc_bin" ]; then
  echo "==> installing opencode-ai@$OPENCODE_VERSION from npm"
  rm -rf "$oc_dir.tmp" && mkdir -p "$oc_dir.tmp"
  (cd "$oc_dir.tmp" && npm install --silent --no-audit --no-fund "opencode-ai@$OPENCODE_VERSION" >/dev/null)
  found="$(find "$oc_dir.tmp/node_modules" -path '*opencode-linux-x64*/bin/opencode' -type f | head -n1)"
  [ -n "$found" ] || found="$(find "$oc_dir.tmp/node_modules" -path '*opencode-linux-*/bin/opencode' -type f | head -n1)"
  [ -n "$found" ] || { echo "opencode binary not found in the npm package" >&2; exit 1; }
  mkdir -p "$oc_dir" && cp "$found" "$oc_bin" && chmod 755 "$oc_bin"
  rm -rf "$oc_dir.tmp"
fi

# Up to date already (same Dockerfile, opencode version and base image): nothing more to do. The
# binary above is always there: bench/ runs it on the host beside the sandboxes.
inputs_of() { (cat "$here/Dockerfile"; echo "$OPENCODE_VERSION"; docker image inspect -f '{{.Id}}' "$BASE") | sha256sum | cut -c1-16; }
if docker image inspect "$BASE" >/dev/null 2>&1 && \
   [ "$(docker image inspect -f '{{index .Config.Labels "critique.inputs"}}' "$IMAGE" 2>/dev/null || true)" = "$(inputs_of)" ]; then
  exit 0
fi

# 2. base image
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  if [ "$BASE" != "critique-local/base:bookworm" ]; then
    echo "base image $BASE is not present; pull or load it first" >&2; exit 1
  fi
  command -v debootstrap >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
  mirror="$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -n1 || true)"
  [ -n "$mirror" ] || mirror="$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -n1 || true)"
  [ -n "$mirror" ] || { echo "no Debian mirror found in /etc/apt sources" >&2; exit 1; }
  rootfs="$(mktemp -d /tmp/critique-rootfs.XXXXXX)"
  echo "==> debootstrap bookworm into $rootfs (about 40-90 s)"
  debootstrap --variant=minbase --include="$PACKAGES" bookworm "$rootfs" "$mirror" >/tmp/critique-debootstrap.log 2>&1 \
    || { tail -20 /tmp/critique-debootstrap.log >&2; exit 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
  rm -rf "$rootfs"
fi

# 3. the sandbox image, tagged with a hash of its inputs
ctx="$(mktemp -d /tmp/critique-ctx.XXXXXX)"
trap 'rm -rf "$ctx"' EXIT
cp "$here/Dockerfile" "$ctx/" && cp "$oc_bin" "$ctx/opencode"
inputs="$(inputs_of)"
current="$(docker image inspect -f '{{index .Config.Labels "critique.inputs"}}' "$IMAGE" 2>/dev/null || true)"
if [ "$current" = "$inputs" ]; then exit 0; fi
echo "==> building $IMAGE"
docker build -q --build-arg BASE_IMAGE="$BASE" --label "critique.inputs=$inputs" -t "$IMAGE" "$ctx" >/dev/null
echo "==> built $IMAGE"
