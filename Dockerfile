# nzserve image: the HTTP server (and the nzp tool) with the bundled demo model.
#
#   podman build --format docker -t nzserve .     # or: docker build -t nzserve .
#   podman run --rm -p 127.0.0.1:8080:8080 nzserve
#
# Build stage: Debian 12 with the -dev packages, compiles build/nzserve and
# build/nzp with the Makefile. Runtime: bookworm-slim with only the shared
# libraries the two binaries need (objdump -p: libmicrohttpd.so.12,
# libjansson.so.4, libzstd.so.1, libopenblas.so.0, libsentencepiece.so.0,
# libstdc++/libgcc_s; xxhash is header-only), a non-root user, the demo
# models and a default config (config/docker.json: 0.0.0.0:8080). Every
# setting can be changed with NZSERVE_* variables (server/README.md); models
# can be mounted anywhere, e.g. at /models (the working directory, so a
# relative NZSERVE_MODELS path is looked up there):
#
#   podman run --rm -p 127.0.0.1:8080:8080 -v "$PWD/my-models:/models:ro" \
#     -e NZSERVE_MODELS=my:translate:/models/my.nzp nzserve
#
# The HEALTHCHECK is `nzserve --health-check` (GET /health on the configured
# port, no curl in the image); podman keeps it only with --format docker.
# tests/docker/docker_test.sh (`make docker-test`) builds and exercises this.
FROM debian:bookworm-slim AS build
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      gcc g++ make libc6-dev libjansson-dev libmicrohttpd-dev libzstd-dev libxxhash-dev \
      libopenblas-dev libsentencepiece-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Makefile ./
COPY engine ./engine
COPY models/*.c models/*.cc models/*.h ./models/
COPY server ./server
RUN make -j"$(nproc)" build/nzserve build/nzp && strip build/nzserve build/nzp

FROM debian:bookworm-slim
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      libmicrohttpd12 libjansson4 libzstd1 libopenblas0 libsentencepiece0 \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin nzserve \
 && mkdir -p /models
COPY --from=build /src/build/nzserve /src/build/nzp /usr/local/bin/
# The repository's layout under /opt/nzserve, so the config's relative model
# paths resolve as in a checkout. Every models/demo/*.nzp is copied; a model
# is served once config/docker.json lists it (both demo models are).
COPY config/docker.json /opt/nzserve/config/nzserve.json
COPY models/demo/*.nzp /opt/nzserve/models/demo/
ENV NZSERVE_CONFIG=/opt/nzserve/config/nzserve.json
# numeric, so that Kubernetes' runAsNonRoot can check it
USER 10001:10001
WORKDIR /models
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["/usr/local/bin/nzserve", "--health-check"]
# exec form: nzserve is PID 1 and gets SIGTERM itself (drain, then exit 0
# within shutdown_grace_ms, 8 s in config/docker.json: under the 10 s that
# docker/podman stop waits by default)
ENTRYPOINT ["/usr/local/bin/nzserve"]
