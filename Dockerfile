# syntax=docker/dockerfile:1
# Keystone images: the operator, the runtime and the web console, from one release build.
#   docker build --target operator -t keystone/operator:0.1.0 .
#   docker build --target runtime  -t keystone/runtime:0.1.0 .
#   docker build --target console  -t keystone/console:0.1.0 .

FROM rust:1.95-bookworm AS build
# librdkafka is built from source by rdkafka-sys (its own configure and make).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libsasl2-dev libssl-dev zlib1g-dev pkg-config python3 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p keystone-operator -p keystone-runtime -p keystone-console \
 && mkdir -p /out \
 && cp target/release/keystone-operator target/release/keystone-runtime target/release/keystone-console /out/

# glibc, libgcc, CA certificates and a nonroot user (65532); no shell.
FROM gcr.io/distroless/cc-debian12:nonroot AS base
USER 65532:65532

FROM base AS operator
COPY --from=build /out/keystone-operator /usr/local/bin/keystone-operator
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/keystone-operator"]

FROM base AS runtime
COPY --from=build /out/keystone-runtime /usr/local/bin/keystone-runtime
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/keystone-runtime"]

# The console writes only to /tmp (an emptyDir in the chart's pod); the root
# filesystem can be read-only.
FROM base AS console
COPY --from=build /out/keystone-console /usr/local/bin/keystone-console
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/keystone-console"]
