# The stream image: every `stream` command (run, topics create, simulate, ...).
#   docker build -t stream .
#   docker run --rm stream run --config configs/default.toml --bootstrap-servers broker:9092
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, from the metadata and a stub package, so editing the
# code does not reinstall River, numpy and librdkafka (confluent-kafka wheels).
COPY pyproject.toml README.md ./
COPY stream/__init__.py stream/__init__.py
RUN pip install .

COPY stream ./stream
RUN pip install --no-deps --force-reinstall . \
    && useradd --system --uid 10001 --no-create-home stream

# Relative paths in commands (--config configs/default.toml) resolve here. configs/default.toml is a
# link to stream/default.toml (copied above; also packaged, the default when --config is omitted).
COPY configs ./configs
# Checkpoints live here (a volume in compose); the named volume inherits this owner.
RUN mkdir -p /app/var && chown stream /app/var

USER stream
# Prometheus /metrics (`stream run --metrics-port`, [metrics] port).
EXPOSE 9100
ENTRYPOINT ["stream"]
CMD ["--help"]
