# Builds the `hindsight` binary and ships it in a small Debian image.
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p hindsight-api --bin hindsight \
 && cp target/release/hindsight /usr/local/bin/hindsight

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home hindsight
COPY --from=build /usr/local/bin/hindsight /usr/local/bin/hindsight
USER hindsight
ENV HINDSIGHT_LISTEN_ADDR=0.0.0.0:8080 \
    HINDSIGHT_LOG_FORMAT=json
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/health/ready || exit 1
ENTRYPOINT ["hindsight"]
CMD ["serve"]
