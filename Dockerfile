# syntax=docker/dockerfile:1
# One image for the gateway, the chunker, the embedder and `ingestd migrate`.
# The command picks the process, for example `python -m services.gateway`.
# The cache and bind mounts below need BuildKit, the default builder since
# Docker Engine 23.

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The CPU build of torch comes first, from PyTorch's own index. Installed from
# PyPI as a dependency, torch would bring several GB of CUDA libraries that
# the embedder never uses. Later installs keep it, because it satisfies the
# project's torch requirement.
ARG TORCH_VERSION=2.13.0
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu

# The dependencies from pyproject.toml get a layer of their own, so a change
# to the code alone does not reinstall them.
RUN --mount=type=bind,source=pyproject.toml,target=/tmp/pyproject.toml \
    --mount=type=cache,target=/root/.cache/pip \
    python -c 'import tomllib; print("\n".join(tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself. The build context is mounted read-write so that
# setuptools can write its build files there. BuildKit discards those writes.
RUN --mount=type=bind,source=.,target=/src,rw \
    --mount=type=cache,target=/root/.cache/pip \
    cd /src && pip install --no-deps .

# An unprivileged user, and the default data folder with the blob store. A
# new named volume mounted on the blob folder takes its owner from the image,
# so the services can write to it.
RUN groupadd --system --gid 10001 ingestd \
    && useradd --system --uid 10001 --gid ingestd --create-home \
        --home-dir /home/ingestd ingestd \
    && mkdir -p /var/lib/ingestd/blobs /var/lib/ingestd/keys \
    && chown -R ingestd:ingestd /var/lib/ingestd

ENV INGESTD_HOST=0.0.0.0 \
    INGESTD_DATA_DIR=/var/lib/ingestd

USER ingestd
WORKDIR /home/ingestd

# The default gRPC ports of the gateway, the chunker and the embedder.
EXPOSE 50051 50052 50053

CMD ["ingestd", "--help"]
