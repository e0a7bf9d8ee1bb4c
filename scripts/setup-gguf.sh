#!/usr/bin/env bash
# make setup-gguf (RUNTIME=local) and the Docker images' deps stage: llama.cpp, pinned in
# requirements-gguf.txt, for `make export-gguf` and INFER_BACKEND=llama.cpp. Optional: nothing else
# needs it. Usage: scripts/setup-gguf.sh [VENV]     (VENV: an existing venv, default .venv)
#
# llama-cpp-python has no wheel on PyPI: pip builds llama.cpp from its sdist, which needs cmake >= 3.21
# and a C++17 compiler. They are checked first; when one is missing, one line says what to install
# and nothing is installed. pip keeps the wheel it built in its wheel cache, so the next install on
# this machine (another venv, CI) takes seconds instead of minutes.
#   CMAKE_ARGS   passed to llama.cpp's cmake; default -DLLAVA_BUILD=OFF (no multimodal library: half
#                the build) and no AMX instructions: ggml 0.3.36's AMX kernels die with SIGILL in a
#                thread the kernel has not granted AMX (upstream PR #26954), as on this machine's Xeon.
#                GPU users: CMAKE_ARGS="-DGGML_CUDA=on -DLLAVA_BUILD=OFF" (needs nvcc).
#                pip's wheel cache does not key on CMAKE_ARGS, so a build with other ones skips it
#                (and any prebuilt wheel: a CPU build has the same file name).
#   CMAKE_BUILD_PARALLEL_LEVEL  compile jobs; default: every core.
#
# The converter scripts are not in the wheel. They come from the same version's sdist (pip download;
# LLAMA_CPP_SDIST=path/to/llama_cpp_python-X.tar.gz uses that file instead): convert_hf_to_gguf.py,
# convert_lora_to_gguf.py, conversion/, gguf-py/ and LICENSE, into VENV/share/llama.cpp with a VERSION
# file. They are extracted into a temp dir and renamed into place whole, so a failed or interrupted
# run leaves the previous copy (or none), never a partial one. A rerun with everything in place does
# nothing (VENV/.gguf-installed records what was installed, with which CMAKE_ARGS).
set -euo pipefail
started=$SECONDS
venv=${1:-.venv}
case $0 in */*) here=${0%/*} ;; *) here=. ;; esac
requirements=$(cd "$here/.." && pwd)/requirements-gguf.txt
py="$venv/bin/python"
share="$venv/share/llama.cpp"
stamp="$venv/.gguf-installed"
default_args="-DLLAVA_BUILD=OFF -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'"
cmake_args=${CMAKE_ARGS:-$default_args}
die() { echo "setup-gguf: $*" >&2; exit 2; }

# Shell builtins only up to the compiler check: it must work, and say its line, on any PATH.
[ -x "$py" ] || die "no Python at $py: create the venv first (make setup)"
[ -f "$requirements" ] || die "$requirements is missing"
pins=() version=""
while read -r line; do
    case $line in
        "#"* | "") ;;
        *) pins+=("$line"); case $line in llama-cpp-python==*) version=${line#llama-cpp-python==} ;; esac ;;
    esac
done <"$requirements"
[ -n "$version" ] || die "$requirements pins no llama-cpp-python==VERSION"
want=$(printf '%s\n' "${pins[@]}" "CMAKE_ARGS=$cmake_args")

# ---- nothing to do when the same pins, build options and converter are in place ---------------------
installed() {  # every pin installed at its version
    "$py" -c 'import sys
from importlib.metadata import PackageNotFoundError, version
try:
    sys.exit(any(version(n) != v for n, v in (p.split("==") for p in sys.argv[1:])))
except PackageNotFoundError:
    sys.exit(1)' "${pins[@]}" 2>/dev/null
}
if [ -f "$stamp" ] && [ "$(<"$stamp")" = "$want" ] && [ -f "$share/VERSION" ] \
    && [ "$(<"$share/VERSION")" = "llama-cpp-python==$version" ] && installed; then
    echo "setup-gguf: llama-cpp-python $version and its converter ($share) are in place; nothing to do"
    exit 0
fi

# ---- cmake >= 3.21 and a C++ compiler, before anything is installed ----------------------------------
need=()
if command -v cmake >/dev/null 2>&1; then
    read -r _ _ found _ < <(cmake --version 2>/dev/null) || true
    IFS=. read -r major minor _ <<<"${found:-0.0}"
    [[ $major =~ ^[0-9]+$ && $minor =~ ^[0-9]+$ ]] && ((major > 3 || (major == 3 && minor >= 21))) \
        || need+=("cmake >= 3.21 (found ${found:-one that does not answer --version})")
else
    need+=(cmake)
fi
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || command -v clang++ >/dev/null 2>&1 \
    || need+=("a C++ compiler (c++, g++ or clang++)")
if [ ${#need[@]} -gt 0 ]; then
    what=${need[0]}${need[1]:+ and ${need[1]}}
    die "llama.cpp is built from source and needs $what, not found on PATH: install them (Debian/Ubuntu:" \
        "sudo apt-get install cmake g++; elsewhere: cmake >= 3.21 and a C++17 compiler), then run make setup-gguf again"
fi

# ---- the pinned packages; llama.cpp built by pip, or taken from its wheel cache ----------------------
pip=("$py" -m pip)
no_cache=()
if [ "$cmake_args" != "$default_args" ]; then
    # neither a wheel built with other options (pip's wheel cache, --find-links) nor this build in the cache
    no_cache=(--no-cache-dir --no-binary llama-cpp-python)
    echo "setup-gguf: CMAKE_ARGS=$cmake_args: llama.cpp is built with them, not taken from a wheel or pip's cache"
fi
previous=""
[ -f "$stamp" ] && while read -r line; do case $line in CMAKE_ARGS=*) previous=$line ;; esac; done <"$stamp"
cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
export CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$cores}
echo "setup-gguf: installing requirements-gguf.txt; llama-cpp-python $version builds llama.cpp unless pip's wheel" \
     "cache has it (CMAKE_ARGS=$CMAKE_ARGS, $CMAKE_BUILD_PARALLEL_LEVEL jobs; minutes, once)"
if [ -n "$previous" ] && [ "$previous" != "CMAKE_ARGS=$cmake_args" ]; then
    # pip keeps an installed llama-cpp-python of the pinned version, whatever it was built with
    echo "setup-gguf: the installed llama.cpp was built with $previous; rebuilding it"
    "${pip[@]}" install "${no_cache[@]+"${no_cache[@]}"}" --force-reinstall --no-deps "llama-cpp-python==$version"
fi
"${pip[@]}" install "${no_cache[@]+"${no_cache[@]}"}" -r "$requirements"
"$py" -c "import llama_cpp" || die "llama_cpp was installed but does not load (the error above)"

# ---- the converter scripts from the same version's sdist, renamed into place whole ---------------------
mkdir -p "$venv/share"
rm -rf "$venv"/share/.llama.cpp.tmp.*  # what a killed run left behind
work=$(mktemp -d "$venv/share/.llama.cpp.tmp.XXXXXX")
trap 'rm -rf "$work"' EXIT
sdist=${LLAMA_CPP_SDIST:-}
if [ -z "$sdist" ]; then
    "${pip[@]}" download -q --no-binary llama-cpp-python --no-deps --dest "$work/sdist" "llama-cpp-python==$version"
    for f in "$work"/sdist/*.tar.gz; do sdist=$f; done
fi
[ -f "$sdist" ] || die "no llama-cpp-python $version sdist to take the converter from${sdist:+ ($sdist)}"
top="llama_cpp_python-$version/vendor/llama.cpp"
members=(convert_hf_to_gguf.py convert_lora_to_gguf.py conversion gguf-py LICENSE)
mkdir "$work/new"
tar -xzf "$sdist" -C "$work/new" --strip-components=3 "${members[@]/#/$top/}" 2>"$work/tar.err" \
    || die "$sdist is not llama-cpp-python $version's sdist with its converter: $(head -n 1 "$work/tar.err")"
[ -f "$work/new/conversion/__init__.py" ] && [ -f "$work/new/gguf-py/gguf/__init__.py" ] \
    || die "$sdist has no conversion/__init__.py or gguf-py/gguf/__init__.py under $top"
printf 'llama-cpp-python==%s\n' "$version" >"$work/new/VERSION"
[ ! -e "$share" ] || mv "$share" "$work/old"
mv "$work/new" "$share"
printf '%s\n' "$want" >"$stamp.tmp" && mv "$stamp.tmp" "$stamp"
echo "setup-gguf: llama-cpp-python $version and its converter ($share) installed in $((SECONDS - started)) s"
