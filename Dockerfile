# One image for every medbatch process: `medbatch api`, `medbatch worker`, `medbatch db upgrade`.
FROM python:3.11-slim

# pyproject asks for a torch range; pin it here so an image build is reproducible.
# The PyPI wheel of torch for linux/amd64 bundles CUDA, so the same image scores on a GPU when
# the container is given one (MEDBATCH_DEVICE=auto) and on the CPU otherwise.
ARG TORCH_SPEC="torch==2.13.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 medbatch \
    && useradd --system --uid 10001 --gid medbatch --home-dir /app --no-create-home medbatch

WORKDIR /app

# torch is by far the largest layer: install it before the source so code edits reuse it.
RUN pip install "$TORCH_SPEC"

COPY . /app
# var/ (relative to WORKDIR) holds the embedded beat's schedule file. The artifact folder is
# created here so that a named volume mounted on it starts out owned by the non-root user.
RUN pip install "$TORCH_SPEC" . \
    && mkdir -p /app/var /var/lib/medbatch/artifacts \
    && chown medbatch:medbatch /app/var /var/lib/medbatch/artifacts

ENV MEDBATCH_ARTIFACT_DIR=/var/lib/medbatch/artifacts
# numba caches the genome kernels it compiles next to their source, which is read-only here:
# keep them in a folder the non-root user owns, so each process after the first loads them.
ENV NUMBA_CACHE_DIR=/app/var/numba-cache

USER medbatch

EXPOSE 8000

ENTRYPOINT ["medbatch"]
CMD ["--help"]
