# Shared helpers for hack/*.sh (sourced, not run).

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

# uv from PyPI (pinned), then the locked environment with the trainer extra.
ensure_python_env() {
  local uv_version=0.13.9
  if ! command -v uv >/dev/null 2>&1 || [[ "$(uv --version | cut -d' ' -f2)" != "$uv_version" ]]; then
    step "installing uv $uv_version"
    python3 -m pip install --quiet --user "uv==$uv_version"
    export PATH="$(python3 -m site --user-base)/bin:$PATH"
  fi
  step "Python environment (uv sync --frozen --extra trainer)"
  local start=$SECONDS
  uv sync --frozen --extra trainer
  echo "python environment ready in $((SECONDS - start)) s"
}
