# Multi-stage build: compile with the Rust toolchain, run on a distroless
# base (glibc, no shell, non-root). Trust roots are compiled in (webpki-roots),
# so the runtime image needs no CA bundle.
FROM rust:1-bookworm AS build
WORKDIR /src
# Everything the build reads: the manifest, the sources, the bench the
# manifest declares, and the migrations `sqlx::migrate!` embeds at compile
# time. `.ci/docker-context` checks the crate builds from exactly these.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY migrations ./migrations
COPY build.rs ./
RUN cargo build --release --locked --bin flinks-proxy

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/flinks-proxy /usr/local/bin/flinks-proxy
COPY proxy.toml /etc/flinks-proxy/proxy.toml
ENV FLINKS_PROXY_CONFIG=/etc/flinks-proxy/proxy.toml
USER nonroot:nonroot
# Proxy and admin ports (set listen = "0.0.0.0:8080" / "0.0.0.0:9901" in the
# mounted config to reach them from outside the container).
# healthcheck reads only [admin] listen from the config: no secrets needed.
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s \
  CMD ["/usr/local/bin/flinks-proxy", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/flinks-proxy"]
