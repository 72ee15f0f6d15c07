# One image for every medbatch process: `medbatch api`, `medbatch worker`, `medbatch db upgrade`.
FROM python:3.11-slim

# pyproject asks for a torch range; pin it here so an image build is reproducible.
# TORCH_INDEX_URL picks the build: the CPU wheels by default (a small image for CPU hosts; PyPI's
# linux wheel would pull several GB of CUDA libraries), or a CUDA index for the GPU image
# (docker-compose.gpu.yml: https://download.pytorch.org/whl/cu126).
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 medbatch \
    && useradd --system --uid 10001 --gid medbatch --home-dir /app --no-create-home medbatch

WORKDIR /app

# torch is by far the largest layer: install it before the source so code edits reuse it.
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"

COPY . /app
# var/ (relative to WORKDIR) holds the embedded beat's schedule file. The artifact folder is
# created here so that a named volume mounted on it starts out owned by the non-root user.
# The reference extras: `medbatch models train` and `models evaluate` run in the container too.
RUN pip install --extra-index-url "$TORCH_INDEX_URL" "$TORCH_SPEC" ".[reference]" \
    && mkdir -p /app/var /var/lib/medbatch/artifacts \
    && chown medbatch:medbatch /app/var /var/lib/medbatch/artifacts

ENV MEDBATCH_ARTIFACT_DIR=/var/lib/medbatch/artifacts
# `medbatch demo` reads examples/, which pip does not install: the copy of the source has it.
ENV MEDBATCH_EXAMPLES_DIR=/app/examples
# numba caches the genome kernels it compiles next to their source, which is read-only here:
# keep them in a folder the non-root user owns, so each process after the first loads them.
ENV NUMBA_CACHE_DIR=/app/var/numba-cache

USER medbatch

EXPOSE 8000

ENTRYPOINT ["medbatch"]
CMD ["--help"]
