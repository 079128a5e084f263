# dwsps in a container: `docker build -t dwsps .` then
#   docker run --rm -p 8000:8000 --ulimit nofile=1048576:1048576 dwsps
# Settings come from DWSPS_* variables (or flags after the image name); see docs/operations.md.

# Build the wheels (dwsps and its dependencies, with the Redis backplane) in a throwaway stage,
# on the full image: it has the C compiler the compiled build needs.
FROM python:3.12 AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY src ./src
# src/dwsps/web/dwsps.js is a symlink to the npm package's source: the wheel takes the file.
COPY clients/js/dwsps.js ./clients/js/dwsps.js
# The request path compiled by mypyc (setup.py): mypyc type-checks against the dependencies,
# so they go in first and the wheel is built without isolation; then the dependencies' wheels.
RUN pip install --no-cache-dir '.[redis]' 'mypy>=1.13' 'setuptools>=68' \
    && DWSPS_COMPILE=1 pip wheel --no-cache-dir --no-build-isolation --no-deps --wheel-dir /wheels . \
    && pip wheel --no-cache-dir --wheel-dir /wheels "$(ls /wheels/dwsps-*.whl)[redis]"

FROM python:3.12-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin dwsps
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels 'dwsps[redis]' \
    && rm -rf /wheels
USER dwsps
# Listen on every interface of the container; log JSON lines for the log driver.
ENV DWSPS_HOST=0.0.0.0 \
    DWSPS_PORT=8000 \
    DWSPS_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/live' % os.environ['DWSPS_PORT'], timeout=2)"]
# SIGTERM: clients get 1001 and the process exits 0 (docker stop waits 10 s by default).
STOPSIGNAL SIGTERM
ENTRYPOINT ["dwsps", "serve"]
