# Shared by scripts/start and scripts/test: system packages and the virtual environment.

VENV="${CLAWDBOT_VENV:-.venv}"

log() { printf '[clawdbot] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*"; return 1; fi
}

apt_install() {
  log "installing Debian packages: $*"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

ensure_python_venv() {
  local python="${PYTHON:-python3}"
  if ! "$python" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    log "clawdbot needs Python 3.11 or newer as ${python}"; exit 1
  fi
  if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then apt_install python3-venv; fi
  # llama-cpp-python compiles from source: it needs a C++ compiler and cmake.
  if ! command -v g++ >/dev/null || ! command -v cmake >/dev/null; then apt_install build-essential cmake; fi
}

ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating the virtual environment in $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade 'pip>=24'
}
