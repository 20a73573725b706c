# The thin client (no torch): `mtl-client` on a slim Python image. Build context: ./client.
FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
COPY . /tmp/mtl-client
RUN python -m pip install /tmp/mtl-client && rm -rf /tmp/mtl-client
ENTRYPOINT ["mtl-client"]
CMD ["--help"]
