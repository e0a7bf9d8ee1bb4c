#!/usr/bin/env bash
# The CUDA image, on demand: Dockerfile.cuda built from the air-gapped base with PyPI's CUDA torch, then
# checked inside for what needs no GPU. Not in .ci/run (per commit): the image is 6.5 GB (the CPU one
# 2.4 GB; CUDA's nvidia-* wheels alone are 2.7 GB), a cold build downloads all of it from PyPI and
# writes it twice (deps stage, app stage) on a disk CI shares, and no GPU here can run it. Run it when
# Dockerfile.cuda, docker-compose.cuda.yml or requirements*.txt change; it writes bench/docker-cuda.md.
#
#   1-4. scripts/ci-docker.sh's engine, tools (compose plugin, hadolint), hadolint on both Dockerfiles,
#        `docker compose config -q` of both files, and the base image (sourced, up to the base)
#   5.   make setup CUDA=1 CUDA_BASE_IMAGE=<base>: torch from PyPI (its CUDA build), bitsandbytes' wheel,
#        llama.cpp's CPU backend (the base sets no CUDA_VERSION); build time, cache hits, size
#   6.   in the image, no GPU given: torch.version.cuda is set; bitsandbytes' library for that CUDA
#        version (its own choice of file) is there and loads after `import torch` (the CUDA runtime comes
#        from torch's nvidia-* wheels; bitsandbytes itself loads its CPU library when no GPU answers);
#        llama.cpp loads; `python -m app info` says in one line that there is no GPU and why; a CPU smoke
#        run, `docker compose run --rm train` (tiny, 20 samples, 1 epoch) through docker-compose.cuda.yml
#        with the GPU reservation reset by a third compose file (without the NVIDIA runtime the
#        reservation fails the run: "could not select device driver"), the adapter on the host
#   7.   bench/docker-cuda.md: date, commit, base, versions, size, build time, load, each check PASS/FAIL
#
# Exits non-zero on any FAIL. env: CI_BASE_IMAGE (default chatglm-base:py3.11-bookworm),
# CUDA_TORCH_INDEX_URL (default empty: PyPI; see Dockerfile.cuda).
set -euo pipefail
CI_DOCKER_UNTIL=base
# shellcheck source=scripts/ci-docker.sh
source "$(dirname "$0")/ci-docker.sh"  # cd's to the repo; sets REPO, WORK, BASE_TAG, the cleanup trap

step() { echo; echo "ci-docker-cuda: [$(( $(date +%s) - T0 ))s] $*"; }
die() { echo "ci-docker-cuda: FAILED: $*" >&2; exit 1; }
IMAGE=chatglm-cpu-trainer:cuda
REPORT=bench/docker-cuda.md
export UID GID
GID=$(id -g)

checks=() failed=0
# record NAME PASS|FAIL DETAIL: one row of the report
record() {
    local detail=${3//|/\\|}
    checks+=("| $1 | $2 | ${detail//$'\n'/ } |")
    echo "check: $1: $2: $3"
    [ "$2" = PASS ] || failed=$((failed + 1))
}
in_image() { docker run --rm --entrypoint python "$IMAGE" -c "$1"; }

# ---- 5. the image ------------------------------------------------------------------------------------
step "CUDA image: make setup CUDA=1 CUDA_BASE_IMAGE=$BASE_TAG (torch from ${CUDA_TORCH_INDEX_URL:-PyPI})"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
t=$(date +%s)
if BUILDKIT_PROGRESS=plain make setup CUDA=1 RUNTIME=docker CUDA_BASE_IMAGE="$BASE_TAG" >"$WORK/build.log" 2>&1; then
    built=1
else
    built=0
fi
build_s=$(( $(date +%s) - t ))
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
grep -E "^#[0-9]+ [0-9.]+ (python:|torch |llama.cpp backend:|setup-gguf: .* installed)|^image " "$WORK/build.log" || true
steps=$(grep -oE "^#[0-9]+ \[setup [a-z0-9-]+ [0-9]+/[0-9]+\]" "$WORK/build.log" | sort -u | wc -l)
cached=$(grep -cE "^#[0-9]+ CACHED" "$WORK/build.log" || true)
build="$build_s s, $cached of $steps steps from the build cache"
# the RUN's output, not its command line (which the log shows too)
backend=$(sed -nE 's/^#[0-9]+ [0-9.]+ llama\.cpp backend: //p' "$WORK/build.log" | head -n 1)
if [ "$built" = 1 ]; then
    record "image builds (make setup CUDA=1)" PASS "$build"
else
    tail -40 "$WORK/build.log" >&2
    record "image builds (make setup CUDA=1)" FAIL "$build; $(grep -m1 -iE "error|failed" "$WORK/build.log" || tail -n 1 "$WORK/build.log")"
fi

size_mb="" versions="" cuda=""
if [ "$built" = 1 ]; then
    size_mb=$(( $(docker image inspect -f '{{.Size}}' "$IMAGE") / 1000000 ))
    echo "image size: $size_mb MB"
    # ---- 6. checks in the image ------------------------------------------------------------------------
    step "torch.version.cuda"
    versions=$(in_image "import sys, torch, bitsandbytes
print(sys.version.split()[0], torch.__version__, torch.version.cuda or '-', bitsandbytes.__version__)" 2>"$WORK/err") \
        || { cat "$WORK/err" >&2; versions="? ? - ?"; }
    read -r python_v torch_v cuda bnb_v <<<"$versions"
    versions="Python $python_v, torch $torch_v, CUDA $cuda, bitsandbytes $bnb_v"
    if [ "$cuda" != - ]; then
        record "torch.version.cuda is set" PASS "torch $torch_v, CUDA $cuda"
    else
        record "torch.version.cuda is set" FAIL "torch $torch_v is a CPU build (or did not import)"
    fi

    step "bitsandbytes' CUDA library for torch's CUDA version"
    if out=$(in_image "import ctypes, torch
from bitsandbytes import cextension
from bitsandbytes.cuda_specs import CUDASpecs, get_cuda_version_string, get_cuda_version_tuple
# the file bitsandbytes picks for this CUDA version on a GPU (the capability does not enter the choice)
path = cextension.get_cuda_bnb_library_path(CUDASpecs((0, 0), get_cuda_version_string(), get_cuda_version_tuple()))
assert path.is_file(), f'{path} is missing'
lib = ctypes.cdll.LoadLibrary(str(path))  # links to libcudart/cublas from torch's nvidia-* wheels
assert hasattr(lib, 'get_context'), f'{path.name} is not a CUDA build'
print(f'{path.name} loads (CUDA build); without a GPU bitsandbytes uses', cextension.lib._lib._name.rsplit('/', 1)[-1])" \
        2>"$WORK/err"); then
        record "bitsandbytes finds its CUDA library" PASS "$out"
    else
        cat "$WORK/err" >&2
        record "bitsandbytes finds its CUDA library" FAIL "$(tail -n 1 "$WORK/err")"
    fi

    step "llama.cpp in the image"
    if out=$(in_image "import pathlib, llama_cpp
libs = sorted(p.name for p in pathlib.Path(llama_cpp.__file__).parent.joinpath('lib').glob('libggml-*.so'))
cuda = any('cuda' in n for n in libs)
print('llama_cpp', llama_cpp.__version__, 'loads,', 'CUDA' if cuda else 'CPU', 'backend:', ' '.join(libs))" 2>"$WORK/err"); then
        record "llama.cpp loads" PASS "$out"
    else
        cat "$WORK/err" >&2
        record "llama.cpp loads" FAIL "$(tail -n 1 "$WORK/err")"
    fi

    step "python -m app info, no GPU given"
    if info=$(docker run --rm -e MODEL_NAME=tiny "$IMAGE" info 2>"$WORK/err"); then
        echo "$info"
        gpu_lines=$(grep -E "^ +GPU" <<<"$info" || true)
        if [ "$(grep -c . <<<"$gpu_lines")" = 1 ] && grep -q "none: .*CUDA $cuda, but: " <<<"$gpu_lines"; then
            record "info reports no GPU in one line" PASS "$(sed -E 's/^ +//; s/  +/ /' <<<"$gpu_lines")"
        else
            record "info reports no GPU in one line" FAIL "GPU lines: ${gpu_lines:-none}"
        fi
    else
        cat "$WORK/err" >&2
        record "info reports no GPU in one line" FAIL "info failed: $(tail -n 1 "$WORK/err")"
    fi

    step "CPU smoke run: docker compose run --rm train (tiny, MAX_SAMPLES=20, NUM_EPOCHS=1), GPU reservation reset"
    # The only change to the CUDA services: no device reservation, which needs the NVIDIA runtime.
    printf 'services:\n  train:\n    deploy: !reset {}\n' >"$WORK/no-gpu.yml"
    compose=(docker compose -f docker-compose.yml -f docker-compose.cuda.yml -f "$WORK/no-gpu.yml")
    # A folder made here for the run, so the removal after the check can only reach what this script made
    # (a fixed name could be a folder of yours); models/.last_run (what predict uses) is put back as it was.
    mkdir -p models
    RUN_DIR=$(mktemp -d models/ci-cuda-tiny.XXXXXX)
    last_run=$(cat models/.last_run 2>/dev/null || true)
    t=$(date +%s)
    if "${compose[@]}" run --rm -e MODEL_NAME=tiny -e MAX_SAMPLES=20 -e NUM_EPOCHS=1 \
        -e OUTPUT_DIR="$RUN_DIR" train >"$WORK/train.log" 2>&1; then
        train_s=$(( $(date +%s) - t ))
        tail -5 "$WORK/train.log"
        adapter="$RUN_DIR/adapter_model.safetensors"
        if [ -f "$adapter" ] && [ "$(stat -c %u:%g "$adapter")" = "$(id -u):$(id -g)" ]; then
            done_line=$(grep -oE "done: [^>]*" "$WORK/train.log" | tail -n 1 | sed 's/ -$//' || true)
            record "CPU smoke run trains" PASS "$train_s s; ${done_line:+$done_line; }$adapter on the host, uid $(id -u)"
        else
            record "CPU smoke run trains" FAIL "no $adapter owned by $(id -u):$(id -g) after the run"
        fi
    else
        tail -30 "$WORK/train.log" >&2
        record "CPU smoke run trains" FAIL "train failed: $(tail -n 1 "$WORK/train.log")"
    fi
    rm -rf --one-file-system "$RUN_DIR"
    if [ -n "$last_run" ]; then printf '%s\n' "$last_run" >models/.last_run; else rm -f models/.last_run; fi
fi

# ---- 7. the report ------------------------------------------------------------------------------------
step "$REPORT"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- 2>/dev/null || commit="$commit + uncommitted changes"
{
    echo "# The CUDA image, built without a GPU"
    echo
    echo "Written by \`scripts/ci-docker-cuda.sh\` (on demand, not per commit: see its header), its last run."
    echo "\`Dockerfile.cuda\` built from the air-gapped base with torch from ${CUDA_TORCH_INDEX_URL:-PyPI}, then checked inside"
    echo "with no GPU given: what a GPU machine adds (training on CUDA, 4-bit kernels) is checked there (tests/gpu)."
    echo
    echo "| | |"
    echo "|---|---|"
    echo "| date | $(date -u '+%Y-%m-%d %H:%M UTC') |"
    echo "| commit | $commit |"
    echo "| base image | $BASE_TAG |"
    echo "| versions | ${versions:-not built} |"
    echo "| llama.cpp backend (the build's line) | ${backend:-not in the log: the step came from the build cache} |"
    echo "| image | $IMAGE, ${size_mb:-?} MB |"
    echo "| build | $build |"
    echo "| load average (1, 5, 15 min) | $load_before before the build, $load_after after; $(nproc) CPUs |"
    echo "| engine | Docker $(docker version --format '{{.Server.Version}}' 2>/dev/null), $(docker compose version --short 2>/dev/null | sed 's/^/compose /') |"
    echo
    echo "| check | result | output |"
    echo "|---|---|---|"
    printf '%s\n' "${checks[@]}"
} >"$REPORT"
cat "$REPORT"
[ "$failed" = 0 ] || die "$failed check(s) failed ($REPORT)"
step "done"
