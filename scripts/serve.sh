#!/usr/bin/env bash
# `make serve`: seed a demo repository and a first API key when there are none, say how to call
# the server, then run it in the foreground with default settings (or critique-local.toml).
# Paths come from the server's own configuration (`critique-local config get`), so this script
# and the server agree wherever they are started from. What it creates (.critique-local/,
# repos/) is ignored by git.
set -euo pipefail
cd "$(dirname "$0")/.."
HERE="$PWD"
CLI="$HERE/.venv/bin/critique-local"
ROOT="$("$CLI" config get git.local_root)"
PORT="$("$CLI" config get server.port)"
URL="http://127.0.0.1:$PORT"

if [ ! -d "$ROOT/demo/hello.git" ]; then
  echo "==> creating demo repository $ROOT/demo/hello.git"
  (
    # the operator's own git configuration (signing, hooks, templates) has no say here
    export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    git init -q -b main "$tmp"
    printf 'def greet(name):\n    return f"Hello, {name}!"\n' > "$tmp/hello.py"
    printf 'from hello import greet\n\n\ndef test_greet():\n    assert greet("Ada") == "Hello, Ada!"\n' > "$tmp/test_hello.py"
    printf '# hello\n\nA tiny demo repository for critique-local.\n' > "$tmp/README.md"
    git -C "$tmp" add -A
    git -C "$tmp" -c user.name=demo -c user.email=demo@localhost commit -qm "Initial commit"
    mkdir -p "$ROOT/demo"
    git clone -q --bare "$tmp" "$ROOT/demo/hello.git"
  )
fi

NEW_KEY="(cd $HERE && .venv/bin/critique-local keys create --user NAME)"
if [ -z "$("$CLI" keys list 2>/dev/null | head -n1)" ]; then
  KEY="$("$CLI" keys create --user local | tail -n1)"
  echo
  echo "Your first API key (shown once; create more with: $NEW_KEY):"
  echo "  export CRT_API_KEY=$KEY"
else
  echo
  echo "API keys exist already. Create one with: $NEW_KEY"
fi
# The printed run is a script for the offline model: it edits hello.py and runs the tests.
cat <<MSG

Try it (the scripted model runs offline; see README "The scripted model"). Start a run:
  curl -sS $URL/api/v1/coding-agent/runs \\
    -H "Authorization: Bearer \$CRT_API_KEY" -H "Content-Type: application/json" \\
    -d '{"repository": "demo/hello", "modelId": "critique/scripted", "prompt": "Add a farewell function.\n@write hello.py\ndef greet(name):\n    return f\"Hello, {name}!\"\n\n\ndef farewell(name):\n    return f\"Goodbye, {name}!\"\n@end\n@bash python3 -m pytest -q\n@say Added farewell(name) to hello.py; the tests pass."}'
Follow it until it is idle, then read its patch (RUN_ID: the "id" in the answer):
  $CLI runs watch RUN_ID --key "\$CRT_API_KEY" --url $URL
  curl -sS "$URL/api/v1/coding-agent/runs/RUN_ID?patch=1" -H "Authorization: Bearer \$CRT_API_KEY"

Or watch your runs in the browser (sign in with the key): $URL/ui/

MSG
exec "$CLI" serve
