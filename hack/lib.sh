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

# Debian packages by name, installed only when missing (needs root; `apt-get update` once).
ensure_apt_packages() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  step "installing Debian packages: ${missing[*]}"
  if [[ $(id -u) -ne 0 ]]; then
    echo "need root to install: ${missing[*]}" >&2
    return 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}
