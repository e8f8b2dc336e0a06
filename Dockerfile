# deploylock: the controller and the CLI in one small image.
# Not built in this repository's CI: the development machine has no container
# engine. Build with: docker build -t ghcr.io/deploylock/deploylock:0.1.0 .
#
# Stage 1: a static (musl) build.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
      --bin deploylock-controller --bin deploylock --bin kubectl-deploylock

# Stage 2: distroless, non-root, nothing but the binaries and CA certificates.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/deploylock-controller /usr/local/bin/
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/deploylock /usr/local/bin/
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/kubectl-deploylock /usr/local/bin/
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/deploylock-controller"]
