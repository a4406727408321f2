#!/usr/bin/env bash
# Provides llama.cpp for the GGUF export and its test, both from llama-cpp-python's PyPI sdist
# (pinned with its sha256 in hack/llamacpp_converter.py), which vendors llama.cpp:
#   converter/  llama.cpp's own converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py,
#               conversion/, gguf-py/), what the trainer runs to write GGUF files
#               (KUBETUNE_LLAMACPP_CONVERTER points the trainer here; the trainer image holds
#               the same files at /opt/llama.cpp, extracted by the same
#               hack/llamacpp_converter.py, which pins the sdist);
#   venv/       llama-cpp-python compiled from the same sdist for this machine's CPU (a native
#               build), the real llama.cpp runtime the tests load
#               GGUF files with; its dependencies come from hack/serving/llamacpp.lock.
# Everything lands in ~/.cache/kubetune/llamacpp-<version>-<hash of the lock and the CPU's
# flags>/. A second run installs nothing.
#
# Usage:
#   bash hack/llamacpp.sh              install what is missing, print where it is
#   bash hack/llamacpp.sh --converter  only the converter (no compile)
#   bash hack/llamacpp.sh --print-dir  only print the directory
#
# Environment: KUBETUNE_CACHE_DIR (default ~/.cache/kubetune); LLAMACPP_BUILD_JOBS (compile
# jobs, default 2: the build fits a 2-core CI machine).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The pin (version, sha256, URL) is hack/llamacpp_converter.py's, shared with the trainer image.
read -r VERSION SHA256 URL < <(python3 "$ROOT/hack/llamacpp_converter.py" --pin)
SDIST=llama_cpp_python-$VERSION.tar.gz
LOCK="$ROOT/hack/serving/llamacpp.lock"
CACHE_DIR="${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}"
# A native CPU build (-march=native: AVX2, AVX-512 where the CPU has them), the shared
# library only: no tools, tests or examples. Without AMX: on CPUs that report it (Sapphire
# Rapids and later) ggml's AMX int8 kernel crashes (SIGSEGV in ggml_backend_amx_mul_mat) on
# the tests' q8_0 model, whose rows are narrower than its tiles.
BUILD_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8 -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
# The key holds the CPU's feature flags and the build's arguments besides the lock: a cache
# restored on another CPU builds anew instead of dying of an illegal instruction.
KEY="$({ cat "$LOCK"; echo "$BUILD_ARGS"; grep -m1 '^flags' /proc/cpuinfo || true; } | sha256sum | cut -c1-12)"
DIR="$CACHE_DIR/llamacpp-$VERSION-$KEY"

only_converter=0
case "${1:-}" in
  --print-dir) echo "$DIR"; exit 0 ;;
  --converter) only_converter=1 ;;
  "") ;;
  *) echo "unknown argument: $1" >&2; exit 2 ;;
esac

if [[ -f "$DIR/.complete" ]] || [[ $only_converter == 1 && -f "$DIR/converter/.complete" ]]; then
  echo "llama.cpp: $DIR (nothing to install)"
  exit 0
fi
mkdir -p "$DIR"

sdist="$CACHE_DIR/sdists/$SDIST"
if [[ ! -f "$sdist" ]] || ! echo "$SHA256  $sdist" | sha256sum --check --status; then
  mkdir -p "$(dirname "$sdist")"
  curl --fail --silent --show-error --location --retry 3 -o "$sdist.part" "$URL"
  echo "$SHA256  $sdist.part" | sha256sum --check --status || {
    echo "$SDIST: sha256 mismatch (expected $SHA256)" >&2
    exit 1
  }
  mv "$sdist.part" "$sdist"
fi

if [[ ! -f "$DIR/converter/.complete" ]]; then
  rm -rf "$DIR/converter"
  python3 "$ROOT/hack/llamacpp_converter.py" "$DIR/converter" --sdist "$sdist"
  touch "$DIR/converter/.complete"
fi
if [[ $only_converter == 1 ]]; then
  echo "llama.cpp converter: $DIR/converter"
  exit 0
fi

start=$SECONDS
rm -rf "$DIR/venv"
uv venv --quiet --python 3.11 "$DIR/venv"
VIRTUAL_ENV="$DIR/venv" uv pip sync --quiet "$LOCK"
CMAKE_ARGS="$BUILD_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="${LLAMACPP_BUILD_JOBS:-2}" \
  VIRTUAL_ENV="$DIR/venv" nice uv pip install --quiet --no-deps --no-cache "$sdist"
"$DIR/venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
touch "$DIR/.complete"
echo "llama.cpp: $DIR (compiled in $((SECONDS - start)) s)"
# Builds of other versions or locks are removed.
for old in "$CACHE_DIR"/llamacpp-*; do
  [[ "$old" != "$DIR" && -d "$old" ]] && rm -rf "$old"
done
exit 0
