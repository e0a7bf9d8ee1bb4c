# CPU image: `docker compose run --rm train` (see docker-compose.yml) or
#   docker build -t chatglm-cpu-trainer:cpu . && docker run --rm chatglm-cpu-trainer:cpu info
#
# BASE_IMAGE: any Debian-like image with python3 >= 3.10 and its venv module; pass a mirror
#   when Docker Hub is out of reach, or build one with scripts/make-base-image.sh (no registry).
# TORCH_INDEX_URL: where torch comes from. The CPU index keeps ~4 GB of CUDA libraries out.
# wheels/: wheels put there are preferred (--find-links); a torch wheel there is installed
#   instead of asking TORCH_INDEX_URL, for builds where only PyPI is reachable, and a
#   llama_cpp_python wheel instead of building llama.cpp (see GGUF_CMAKE_ARGS below).
ARG BASE_IMAGE=python:3.11-slim

# ---- dependencies: rebuilt only when requirements*.txt, setup-gguf.sh or wheels/ change ------
FROM ${BASE_IMAGE} AS deps
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /build
COPY requirements.txt ./
COPY wheels/ ./wheels/
# torch first, alone, from the CPU index (or wheels/): the plain PyPI torch is the CUDA build.
# Then the rest from PyPI; the installed torch already satisfies its pin.
RUN set -eu; \
    python -m venv /opt/venv; \
    torch_pin=$(grep -E '^torch==' requirements.txt); \
    version=${torch_pin#torch==}; \
    local_wheel=$(find wheels -maxdepth 1 -name "torch-${version}*.whl" -print -quit); \
    if [ -n "$local_wheel" ]; then \
        echo "torch from $local_wheel"; \
        /opt/venv/bin/pip install --find-links wheels "$local_wheel"; \
    else \
        echo "torch from $TORCH_INDEX_URL"; \
        /opt/venv/bin/pip install --index-url "$TORCH_INDEX_URL" "torch==${version}"; \
    fi; \
    /opt/venv/bin/pip install --find-links wheels -r requirements.txt; \
    /opt/venv/bin/python -c "import torch; assert not torch.version.cuda, 'CPU image got a CUDA torch'"
# llama.cpp for export-gguf and INFER_BACKEND=llama.cpp (requirements-gguf.txt, scripts/setup-gguf.sh):
# llama-cpp-python is built from its sdist, so cmake and g++ are installed in this stage only; the
# app stage gets the venv (the binding and share/llama.cpp, the converter). A llama_cpp_python wheel
# in wheels/ is used instead of the build (minutes). The build is tuned for the CPU that builds the
# image (llama.cpp's GGML_NATIVE): for an image that runs on other CPUs add -DGGML_NATIVE=OFF to
# GGUF_CMAKE_ARGS (another value than the default always builds, ignoring wheels/).
ARG GGUF_CMAKE_ARGS="-DLLAVA_BUILD=OFF -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'"
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends cmake g++ \
    && rm -rf /var/lib/apt/lists/*
COPY requirements-gguf.txt ./
COPY scripts/setup-gguf.sh ./scripts/
RUN PIP_FIND_LINKS=wheels CMAKE_ARGS="$GGUF_CMAKE_ARGS" scripts/setup-gguf.sh /opt/venv

# ---- app: only this part is rebuilt when the code changes ------------------------------------
FROM ${BASE_IMAGE}
ARG BASE_IMAGE
# What it was built from: `make` rebuilds on the same base unless told otherwise.
LABEL org.opencontainers.image.base.name=${BASE_IMAGE}
# HOME and the HF cache are world-writable because compose runs as the invoking user
# (user: UID:GID), whose uid is not known when the image is built; a fresh named volume
# mounted on /cache/huggingface takes this directory's mode.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/app \
    HF_HOME=/cache/huggingface \
    MPLCONFIGDIR=/opt/matplotlib \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN useradd --uid 1000 --user-group --create-home --home-dir /home/app --shell /bin/sh app \
    && mkdir -p /cache/huggingface /app/data /app/models \
    && chmod 1777 /home/app /cache/huggingface \
    && chown app:app /app/data /app/models
# A CJK font, so the Chinese labels in the plots (per_predicate_f1.png) are not empty boxes:
# fonts-wqy-microhei is the smallest one Debian and Ubuntu ship (5 MB, no dependencies). Installed
# before matplotlib's font cache is built below, so the cache lists it. libgomp1: the OpenMP runtime
# llama.cpp's libggml links to (torch bundles its own copy). Not version-pinned: the base image's
# apt snapshot decides.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends fonts-wqy-microhei libgomp1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=deps /opt/venv /opt/venv
# matplotlib's font cache, built once here instead of on every run (the plots need it)
RUN mkdir -m 1777 /opt/matplotlib && python -c "import matplotlib.font_manager"
WORKDIR /app
COPY pyproject.toml requirements.txt .env.template ./
COPY bench/ bench/
COPY tests/ tests/
COPY app/ app/
# numeric, so runtimes that enforce runAsNonRoot can check it
USER 1000:1000
ENTRYPOINT ["python", "-m", "app"]
CMD ["--help"]
