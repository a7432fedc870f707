#!/usr/bin/env bash
# `make serve`: seed a demo repository and a first API key when there are none, say how to call
# the server, then run it in the foreground with default settings (or critique-local.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
ROOT="${CRITIQUE_LOCAL_GIT_LOCAL_ROOT:-./repos}"
PORT="${CRITIQUE_LOCAL_SERVER_PORT:-8787}"

if [ ! -d "$ROOT/demo/hello.git" ]; then
  echo "==> creating demo repository $ROOT/demo/hello.git"
  tmp="$(mktemp -d)"
  git init -q -b main "$tmp"
  printf 'def greet(name):\n    return f"Hello, {name}!"\n' > "$tmp/hello.py"
  printf 'from hello import greet\n\n\ndef test_greet():\n    assert greet("Ada") == "Hello, Ada!"\n' > "$tmp/test_hello.py"
  printf '# hello\n\nA tiny demo repository for critique-local.\n' > "$tmp/README.md"
  git -C "$tmp" add -A
  git -C "$tmp" -c user.name=demo -c user.email=demo@localhost commit -qm "Initial commit"
  mkdir -p "$ROOT/demo"
  git clone -q --bare "$tmp" "$ROOT/demo/hello.git"
  rm -rf "$tmp"
fi

if [ -z "$($BIN/critique-local keys list 2>/dev/null | head -n1)" ]; then
  KEY="$($BIN/critique-local keys create --user local | tail -n1)"
  echo
  echo "Your first API key (shown once; create more with: $BIN/critique-local keys create --user NAME):"
  echo "  export CRT_API_KEY=$KEY"
else
  echo
  echo "API keys exist already. Create one with: $BIN/critique-local keys create --user NAME"
fi
cat <<MSG

Try it (the scripted model runs offline; see README):
  curl -s http://127.0.0.1:$PORT/api/v1/coding-agent/runs \\
    -H "Authorization: Bearer \$CRT_API_KEY" -H "Content-Type: application/json" \\
    -d '{"repository": "demo/hello", "prompt": "Add a farewell function", "modelId": "critique/scripted"}'
  $BIN/critique-local runs list --key "\$CRT_API_KEY" --url http://127.0.0.1:$PORT

MSG
exec $BIN/critique-local serve
