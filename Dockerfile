# syntax=docker/dockerfile:1
# The cellmodel image: this repository installed (`pip install .`, dependencies from
# pyproject.toml only) on Ray's official image. One file, two variants:
#
#   docker build --build-arg FLAVOR=cpu -t ghcr.io/cellmodel/cellmodel:0.1.0-cpu .
#   docker build --build-arg FLAVOR=gpu -t ghcr.io/cellmodel/cellmodel:0.1.0-gpu .
#
# cpu: rayproject/ray:<ray>-py311 with CPU-only PyTorch wheels (Serve replicas, CPU jobs);
# gpu: rayproject/ray:<ray>-py311-gpu with PyPI's CUDA PyTorch wheels (training, GPU slides).
# infra/rayjob.yaml, infra/cluster.yaml (gpu) and infra/rayservice.yaml (cpu) name these
# tags; tests/test_infra_manifests.py checks that they do, that RAY_VERSION is the Ray the
# project is tested with, and that the only thing installed is the project itself.
# Why an image and not the official image plus a runtime_env: docs/cluster.md.

ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG FLAVOR=cpu

FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG} AS base-cpu
# PyTorch's CPU wheels: the default Linux wheels on PyPI bring several GB of CUDA libraries.
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu AS base-gpu

FROM base-${FLAVOR}
ARG RAY_VERSION
ARG FLAVOR
LABEL org.opencontainers.image.title="cellmodel" \
      org.opencontainers.image.description="White-blood-cell classification on Ray (Xception + BiLSTM)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.cellmodel.flavor="${FLAVOR}" \
      io.cellmodel.ray-version="${RAY_VERSION}"
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The official images run as the user `ray`; pip builds in the source folder, so it is ray's.
USER root
RUN mkdir -p /app && chown ray /app
USER ray
WORKDIR /app

# Dependencies first, from pyproject.toml alone, so that a code change does not reinstall
# PyTorch: with no package folders yet, `pip install .` installs only the dependencies.
# The base image's Ray already satisfies the `ray[...]` requirement and is kept as it is.
COPY --chown=ray pyproject.toml README.md ./
RUN pip install . && pip uninstall -y cellmodel && rm -rf build *.egg-info

# Then the project itself. /app keeps the source too: it is the jobs' working_dir
# (jobs/configs/*.toml, data/sample) and where `ray start` runs.
COPY --chown=ray . .
RUN pip install --no-deps . \
    && rm -rf build *.egg-info \
    && python -c "import cellmodel, jobs, serve, ray; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"
