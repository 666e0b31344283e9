# Sourced by scripts/run and scripts/test: make .venv and install mpproxy into it.
# Usage: ensure_venv [EXTRA]   (EXTRA e.g. "test" installs mpproxy[test])
ensure_venv() {
    local root extra marker want
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    extra="${1:-}"
    VENV="$root/.venv"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "scripts: creating $VENV" >&2
        "${PYTHON:-python3}" -m venv "$VENV" || { echo "scripts: cannot create $VENV" >&2; return 1; }
    fi
    marker="$VENV/.mpproxy-installed${extra:+-$extra}"
    want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
    if [ ! -f "$marker" ] || [ "$(cat "$marker")" != "$want" ]; then
        echo "scripts: installing mpproxy${extra:+[$extra]} into $VENV" >&2
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
            -e "$root${extra:+[$extra]}" || { echo "scripts: pip install failed" >&2; return 1; }
        echo "$want" > "$marker"
    fi
}
