#!/usr/bin/env bash
# The GPU tier (`make test-gpu`) on a GPU machine with no network, such as the device tool's H100/H200,
# whose python3 holds a CUDA torch but not all of this project's stack.
#
# Prepare here, once, with network:  scripts/gpu-wheels.sh     (the missing wheels -> .gpu-wheels/, ignored)
# Then hand this script, unchanged, to the device tool:
#     run(command="scripts/gpu-check.sh", carry=[".gpu-wheels"], timeout_s=540)
# It makes a venv over that python3 (its CUDA torch and packages stay visible), installs the wheels, checks
# the imports, and runs `make test-gpu RUNTIME=local REQUIRE_GPU=1` (no GPU is then a failure, not a skip).
# What comes back in $OUT: gpu.md and gpu.json (the tier's report, bench/), gpu-check.log (all output).
# The whole script ends within GPU_CHECK_TIMEOUT (480 s: the tier's own bound, bench/bench_gpu.py, less the
# ~20 s of setup here). With the machine's start (1-2 min) that is about 10 of the device's 15 minutes: a retry
# after an early failure (a wheel, an import: the first 30 s) fits, a second full run does not.
#
# Settings (environment): PYTHON (python3: the one with CUDA torch), VENV (/tmp/gpu-venv: made afresh),
# GPU_WHEELS_DIR (.gpu-wheels), GPU_CHECK_TIMEOUT (480).
set -euo pipefail
start=$SECONDS
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=${VENV:-/tmp/gpu-venv}
wheels=${GPU_WHEELS_DIR:-.gpu-wheels}
budget=${GPU_CHECK_TIMEOUT:-480}
say() { echo "gpu-check: $*"; }

if ! compgen -G "$wheels/*.whl" >/dev/null; then
    say "no wheels in GPU_WHEELS_DIR=$wheels: run scripts/gpu-wheels.sh where pip can reach pypi.org, then carry $wheels" >&2
    exit 2
fi
if [[ -e $venv && ! -f $venv/pyvenv.cfg ]]; then
    say "VENV=$venv exists and is not a venv: name a new folder (it is made afresh)" >&2
    exit 2
fi
if [[ -n ${OUT:-} ]]; then
    exec > >(tee "$OUT/gpu-check.log") 2>&1  # under $OUT it comes back even if the run is cut off
    tee_pid=$!
    trap 'exec >&- 2>&-; wait "$tee_pid"' EXIT  # tee's last lines, before the tool reads the output
fi

say "nvidia-smi -L: $(nvidia-smi -L 2>&1 | paste -sd ';' || true)"
"$python" -c 'import sys, torch
print(f"gpu-check: python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, GPU visible to torch: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    print("gpu-check: torch sees no CUDA GPU here; the tier still runs and, with REQUIRE_GPU=1, fails saying so")' ||
    { say "PYTHON=$python cannot import torch (above): name the Python that holds the CUDA torch" >&2; exit 2; }

# A venv made from a venv (the device's python3 is /opt/torch/.venv's) sees only the base Python's
# packages through --system-site-packages, not that venv's; a .pth adds them after the venv's own, so the
# carried wheels come first and the image's torch and the rest stay visible.
"$python" -m venv --clear --system-site-packages --without-pip "$venv"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
"$python" -c 'import site
print("\n".join(f"import site; site.addsitedir({p!r})" for p in site.getsitepackages()))' >"$site/_outer_site.pth"
# --ignore-installed: a version the image already has is installed in the venv all the same, and
# nothing outside the venv is touched. The machine's pip config plays no part (no index is used).
PIP_CONFIG_FILE=/dev/null "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-index --no-deps \
    --no-compile --no-cache-dir --ignore-installed "$wheels"/*.whl
say "installed $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $venv ($((SECONDS - start)) s)"

smoke_ok=1
"$venv/bin/python" - <<'EOF' || smoke_ok=0
import importlib, importlib.metadata as md, sys

names = ["app", "transformers", "peft", "trl", "bitsandbytes", "deepspeed", "fastapi", "openai"]
seen, failed = [], []
for name in names:
    try:
        importlib.import_module(name)
        seen.append(name if name == "app" else f"{name} {md.version(name)}")
    except Exception as exc:  # one line per failure: the tier's report says which tests needed it
        failed.append(f"{name} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
print("gpu-check: imports:", ", ".join(seen))
if failed:
    print("gpu-check: imports FAILED:", "; ".join(failed))
sys.exit(1 if failed else 0)
EOF
# Conflicts between the carried wheels and the image's packages, one line each (only lines naming a
# carried package: the image's own are not this project's).
carried=$(ls "$wheels"/*.whl | xargs -n1 basename | cut -d- -f1 | sed 's/[-_.]/[-_.]/g' | paste -sd '|')
"$venv/bin/python" -m pip check --disable-pip-version-check 2>&1 | grep -iE "^($carried) " | sed 's/^/gpu-check: pip check: /' || true

touch "$venv/.installed"  # the Makefile's setup stamp: make runs no setup over this venv
marker=$venv/.tier-started
touch "$marker"
left=$((budget - (SECONDS - start) - 10))  # 10 s to copy the results back
((left > 0)) || left=1                      # (timeout 0 would mean no limit)
if command -v make >/dev/null; then
    tier=(make test-gpu RUNTIME=local VENV="$venv" REQUIRE_GPU=1)
else
    say "no make here: running $venv/bin/python -m bench.bench_gpu (what make test-gpu runs) with REQUIRE_GPU=1"
    tier=(env REQUIRE_GPU=1 "$venv/bin/python" -m bench.bench_gpu)
fi
say "running: ${tier[*]} (at most $left s)"
rc=0
PYTHONUNBUFFERED=1 timeout --kill-after=5 "$left" "${tier[@]}" || rc=$?
if ((rc == 124 || rc == 137)); then
    say "the tier ran past GPU_CHECK_TIMEOUT=$budget s and was stopped"
fi

if [[ -n ${OUT:-} ]]; then
    for f in bench/gpu.md bench/gpu.json; do
        if [[ $f -nt $marker ]]; then cp "$f" "$OUT/"; else say "$f was not written by this run"; fi
    done
fi
if ((!smoke_ok)); then
    say "an import failed (above)"
    ((rc)) || rc=1
fi
say "done in $((SECONDS - start)) s (GPU_CHECK_TIMEOUT=$budget), exit $rc"
exit "$rc"
