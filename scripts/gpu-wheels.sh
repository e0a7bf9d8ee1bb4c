#!/usr/bin/env bash
# The wheels the GPU tier needs on a GPU machine with no network (the device tool's H100/H200: its image
# has CUDA torch and much of the stack, not all of it, and some at other versions). Run here, with network
# to pypi.org; then scripts/gpu-check.sh runs there with this folder carried (its header says how).
# Usage: scripts/gpu-wheels.sh
# Settings (environment): GPU_WHEELS_DIR (.gpu-wheels), PYTHON_VERSION (3.12: the device's; 3.11 fetches a
# set for a local emulation), PYTHON (.venv/bin/python: runs pip, checks the set, builds deepspeed).
set -euo pipefail
cd "$(dirname "$0")/.."

# What the device image lacks, or holds at another version than requirements.txt pins. A bare name
# takes requirements.txt's pin (tests/project/test_gpu_check.py checks that every package the tier
# uses is here or in DEVICE_HAS); the rest are pinned at the versions .venv resolved.
PACKAGES=(
    # the tier's stack (the image has transformers 5.17.0 and tokenizers 0.23.2, peft at an unknown
    # version, no trl, bitsandbytes or datasets)
    transformers tokenizers peft trl bitsandbytes datasets python-dotenv
    # datasets' needs: the image lacks dill and multiprocess, and may hold an fsspec newer than datasets allows
    dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0
    # make serve (FastAPI, uvicorn, SSE) and the openai client the serve tests talk to it with
    fastapi uvicorn sse-starlette openai
    starlette==1.10.0 opentelemetry-api==1.45.3 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5
    jiter==0.19.0 sniffio==1.3.1
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    # DS_CONFIG (ZeRO): PyPI has only deepspeed's sdist, so it is built below as a pure wheel (its pin:
    # requirements-deepspeed.txt)
    deepspeed hjson==3.1.0
)
# What those wheels need that the image already has (its package list as the device tool's notes give
# it, 2026-11), with the version where one was read there. Only names are checked below: gpu-check.sh
# prints any version conflict there (pip check).
DEVICE_HAS=(
    torch accelerate==1.15.0 safetensors==0.8.0 huggingface-hub==1.33.0 numpy==2.5.2 packaging pyyaml
    regex tqdm psutil filelock pandas pyarrow xxhash requests jinja2 typer click h11 anyio idna certifi
    typing-extensions annotated-doc msgpack ninja py-cpuinfo einops nvidia-ml-py aiohttp
    tensorboard matplotlib pytest
)

wheels=${GPU_WHEELS_DIR:-.gpu-wheels}
pyver=${PYTHON_VERSION:-3.12}
py=${PYTHON:-.venv/bin/python}
cap_mib=60  # the device tool carries at most 64 MiB (tree + carried folders); keep some room
# Wheels for glibc 2.28 or older, which any current image has. pip matches a manylinux tag's N exactly,
# so each N is named.
platforms=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
for n in $(seq 17 28); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
# This machine's pip config adds local indexes, find-links and a constraints file: none of them is
# for the device, so pip here sees pypi.org alone.
unset PIP_FIND_LINKS PIP_CONSTRAINT PIP_EXTRA_INDEX_URL PIP_INDEX_URL
export PIP_CONFIG_FILE=/dev/null
[[ -x $py ]] || { echo "gpu-wheels: PYTHON=$py is not there: make setup RUNTIME=local first, or name a Python with torch and packaging" >&2; exit 2; }
pip=("$py" -m pip --disable-pip-version-check)
index=(--index-url https://pypi.org/simple)

specs=()
for p in "${PACKAGES[@]}"; do
    if [[ $p != *==* ]]; then
        pin=$(cat requirements.txt requirements-deepspeed.txt | grep -iE "^${p}==") || { echo "gpu-wheels: $p has no pin in requirements.txt: pin it there or here" >&2; exit 2; }
        p=$pin
    fi
    [[ $p == deepspeed==* ]] && ds=$p && continue  # built below, not downloaded
    specs+=("$p")
done

mkdir -p "$wheels"
rm -f "$wheels"/*.whl  # one version of each: two of one package stop the install there
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"${pip[@]}" download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    "${platforms[@]}" "${index[@]}" -d "$wheels" "${specs[@]}"

# deepspeed: built from its sdist with no ops compiled ahead (DS_BUILD_OPS=0), so the wheel is pure
# Python and deepspeed builds the ops it needs there, with the image's nvcc and ninja, on first use.
DS_BUILD_OPS=0 "${pip[@]}" wheel -q --no-deps --no-build-isolation --no-binary deepspeed "${index[@]}" -w "$tmp" "$ds"
ls "$tmp"/deepspeed-*-py3-none-any.whl >/dev/null 2>&1 || { echo "gpu-wheels: the $ds build is not a pure py3-none-any wheel: $(ls "$tmp")" >&2; exit 1; }
mv "$tmp"/deepspeed-*.whl "$wheels"/

# bitsandbytes' x86_64 wheel is ~43 MB: it carries a library for each CUDA from 11.8 to 13.2, ROCm and
# XPU. The device's torch is a CUDA 13.0 build, and the device tool carries at most 64 MiB, so the wheel
# is rewritten with only the CUDA 13 and CPU libraries (and RECORD without the dropped files).
"$py" - "$wheels"/bitsandbytes-*.whl <<'EOF'
import os, re, sys, zipfile

path = sys.argv[1]
keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d*)\.so$")
drop = lambda name: re.search(r"libbitsandbytes_\w+\.so$", name) and not keep.search(name)
with zipfile.ZipFile(path) as src, zipfile.ZipFile(path + ".slim", "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        if drop(info.filename):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if not drop(line.split(",")[0])).encode()
        dst.writestr(info, data, zipfile.ZIP_DEFLATED)
os.replace(path + ".slim", path)
EOF

# Every need of every wheel (for this Python, no extras) is another wheel here, at a version it
# accepts, or a package the device image has.
"$py" - "$wheels" "$pyver" "${DEVICE_HAS[@]}" <<'EOF'
import sys, zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

folder, pyver, device = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
has = {canonicalize_name(d.split("==")[0]) for d in device}
env = {"python_version": pyver, "python_full_version": pyver + ".0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}
wheels = {name: (version, f) for f in folder.glob("*.whl") for name, version, *_ in [parse_wheel_filename(f.name)]}
problems = []
for name, (version, f) in sorted(wheels.items()):
    with zipfile.ZipFile(f) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker and not req.marker.evaluate(env):
            continue
        need = canonicalize_name(req.name)
        if need in wheels:
            if not req.specifier.contains(wheels[need][0], prereleases=True):
                problems.append(f"{name} {version} needs {req}, but {need} {wheels[need][0]} is here")
        elif need not in has:
            problems.append(f"{name} {version} needs {req}: add it to PACKAGES (or DEVICE_HAS if the image has it)")
for p in problems:
    print("gpu-wheels:", p, file=sys.stderr)
sys.exit(1 if problems else 0)
EOF

# what the device tool sends: tracked files and untracked ones git does not ignore (a deleted one is skipped)
tree=$(git ls-files -z --cached --others --exclude-standard | { xargs -0 stat -c %s 2>/dev/null || true; } |
       awk '{s += $1} END {print s + 0}')
carry=$(cat "$wheels"/*.whl | wc -c)
count=$(ls "$wheels"/*.whl | wc -l)
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
echo "gpu-wheels: $count wheels for Python $pyver in $wheels: $(mib "$carry") MiB;" \
     "with the tree that travels ($(mib "$tree") MiB): $(mib $((tree + carry))) MiB (cap $cap_mib MiB; the device tool's limit is 64)"
if (( tree + carry > cap_mib * 1048576 )); then
    echo "gpu-wheels: over $cap_mib MiB: drop a wheel from PACKAGES, or slim one as bitsandbytes is" >&2
    exit 1
fi
