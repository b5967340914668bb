# nzserve image. Until the server lands (issue 5) it ships the `nzp` tool:
#   podman/docker run --rm -v "$PWD/models:/models" nzserve info /models/model.nzp
# Build stage: Debian 12 with the -dev packages; runtime: bookworm-slim with the
# runtime libraries only, non-root user.
FROM debian:bookworm-slim AS build
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      gcc g++ make libc6-dev libjansson-dev libzstd-dev libxxhash-dev libopenblas-dev libsentencepiece-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Makefile ./
COPY engine ./engine
COPY models ./models
RUN make -j"$(nproc)" build/nzp && strip build/nzp

FROM debian:bookworm-slim
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      libjansson4 libzstd1 libopenblas0 libsentencepiece0 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin nzserve \
 && mkdir -p /models && chown nzserve /models
COPY --from=build /src/build/nzp /usr/local/bin/nzp
USER nzserve
WORKDIR /models
VOLUME ["/models"]
ENTRYPOINT ["/usr/local/bin/nzp"]
CMD ["--help"]
