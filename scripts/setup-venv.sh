#!/usr/bin/env bash
# make setup (RUNTIME=local): the venv with requirements.txt's pins and the torch build this machine
# can use. Usage: scripts/setup-venv.sh [VENV] [PYTHON]
#
# Why torch is installed first, on its own: `pip install torch==X` from the public index on a Linux
# box is the CUDA build, which drags in several GB of nvidia-* libraries, useless without an NVIDIA
# GPU. So where no NVIDIA GPU answers, torch comes from TORCH_INDEX_URL (default: the PyTorch CPU
# index). Where that index does not answer, the default index is used after a short timeout, with
# no retries, and one line says so. The last line names the torch build that was installed.
set -euo pipefail
venv=${1:-.venv}
python=${2:-python3}
index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
torch_pin=$(grep -E '^torch==' requirements.txt)

gpu=0
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU' && gpu=1

# A full disk stops pip halfway, in a traceback, with a half-made venv: check first and say it in
# one line. Measured: the CPU venv is 2.3 GB, the CUDA one 6.2 GB (nvidia-* wheels 2.7 GB); a venv
# already there counts towards what it needs.
need_mb=$(( gpu ? 7000 : 2600 ))
[ -d "$venv" ] && need_mb=$(( need_mb - $(du -sm "$venv" | cut -f1) ))
where=$venv
while [ ! -e "$where" ]; do where=$(dirname "$where"); done
free_mb=$(df -Pm "$where" | awk 'NR == 2 {print $4}')
if [ "$free_mb" -lt "$need_mb" ]; then
    echo "setup: $free_mb MB free on the disk of $where, but the venv $venv needs about $need_mb MB more" \
         "(torch and requirements.txt); free space there, or set VENV to a folder on a larger disk" >&2
    exit 1
fi

"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip

if [ "$gpu" = 1 ]; then
    echo "setup: an NVIDIA GPU answers (nvidia-smi -L): $torch_pin from the default index (its CUDA build)"
    "${pip[@]}" install -q "$torch_pin"
elif "${pip[@]}" install -q --timeout 10 --retries 0 --index-url "$index" "$torch_pin"; then
    echo "setup: no NVIDIA GPU: $torch_pin from TORCH_INDEX_URL=$index"
else
    echo "setup: TORCH_INDEX_URL=$index did not answer; installing $torch_pin from the default index instead" \
         "(on Linux that can be the multi-GB CUDA build: set TORCH_INDEX_URL to a reachable CPU index to avoid it)"
    "${pip[@]}" install -q "$torch_pin"
fi
"${pip[@]}" install -q -r requirements.txt
"$venv/bin/python" -c 'import torch
cuda = torch.version.cuda
print(f"setup: torch {torch.__version__}, " + (f"CUDA {cuda} build" if cuda else "CPU build"))'
