# The Koala fleet on the CPU: one image for the producer (`koala submit ...`), the download workers
# (`koala worker download`), the embed worker (`koala worker embed`) and Flower (`celery ... flower`).
#   docker compose build          (or: docker build -t koala-fleet .); no .env needed for it
# Dockerfile.gpu builds the embed worker on a CUDA TensorFlow image (docker-compose.gpu.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The dependencies first, in their own layer (a code change does not download them again), read from
# pyproject.toml; then the project itself, from a copy of what `pip install .` needs (the metadata,
# the README it names, the three packages with common/model/*.tsv). No test extras; the sources are
# removed after the install, so the code runs from site-packages only.
COPY pyproject.toml /src/
RUN python3 -c "import tomllib; print(*tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies'], sep='\\n')" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY README.md /src/
COPY common/ /src/common/
COPY producer/ /src/producer/
COPY workers/ /src/workers/
RUN pip install --no-cache-dir /src && rm -rf /src

# A non-root user. The workers write into the ./data bind mount: build with APP_UID/APP_GID =
# `id -u`/`id -g` of the owner of ./data (compose passes them from .env). --non-unique: the base
# image may already use those IDs.
ARG APP_UID=10001
ARG APP_GID=10001
RUN if [ "${APP_UID}" = 0 ] || [ "${APP_GID}" = 0 ]; then \
        echo "APP_UID/APP_GID 0 would run the fleet as root: keep 10001 and chown -R 10001:10001 ./data" >&2; \
        exit 1; \
    fi \
    && groupadd --non-unique --gid "${APP_GID}" koala \
    && useradd --non-unique --uid "${APP_UID}" --gid koala --create-home --home-dir /home/koala \
       --shell /usr/sbin/nologin koala \
    && mkdir -p /app /data/tfrecords /data/cache /data/original \
    && chown koala:koala /app /data /data/tfrecords /data/cache /data/original

ENV KOALA_OUTPUT_DIR=/data/tfrecords KOALA_CACHE_DIR=/data/cache

WORKDIR /app
USER koala

# `docker run IMAGE worker download`, `... worker embed ...`, `... submit /data/urls.txt --wait`
ENTRYPOINT ["koala"]
CMD ["--help"]
