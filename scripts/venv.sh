#!/usr/bin/env bash
# The light set-up: .venv with hybridmig (editable), its native module and
# the extras named in $1 (comma-separated, e.g. "test,lint"). Needs no root
# and no CRIU: enough for `make lint` and `make test-unit` on a fresh clone.
# `make setup` runs it too, then adds pycriu. A second run takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
want=${1:-}
stamp=$VENV/.hybridmig-installed

if [ ! -x "$VENV/bin/python" ]; then
    printf '== creating %s\n' "$VENV"
    python3 -m venv "$VENV"
fi
# The stamp lists the extras installed; reinstall when one is missing or the
# package or native sources changed since (the module would be refused as stale).
have=$(cat "$stamp" 2>/dev/null || true)
extras=$(printf '%s\n' ${have//,/ } ${want//,/ } | sort -u | paste -sd, -)
newest=$(find pyproject.toml setup.py native -newer "$stamp" -print -quit 2>/dev/null || true)
if [ ! -f "$stamp" ] || [ -n "$newest" ] || [ "$extras" != "$have" ]; then
    spec=.${extras:+[$extras]}
    printf '== installing hybridmig%s into %s\n' "${spec#.}" "$VENV"
    # (this machine's pip config names index folders that may not exist: drop that noise)
    "$VENV/bin/pip" install -q --disable-pip-version-check -e "$spec" 2> >(grep -v 'is ignored' >&2)
    echo "$extras" >"$stamp"
fi
"$VENV/bin/python" -c 'import hybridmig._native' || { echo "venv: the native module does not import" >&2; exit 1; }
# The CRIU hook, compiled (it starts inside the blackout: criu/hook.py says
# why); the sha256 of its source goes in, criu/command.py refuses a stale one.
hook=src/hybridmig/criu/_hook
if [ ! -x "$hook" ] || [ native/hook/criu_hook.c -nt "$hook" ]; then
    sha=$(sha256sum native/hook/criu_hook.c | cut -d' ' -f1)
    cc -O2 -Wall -Wextra -Werror -std=gnu11 -DHOOK_SOURCE_SHA256="\"$sha\"" -o "$hook" native/hook/criu_hook.c
fi
