# dlb: one image with every binary (dlb, dlb-compute, dlb-gateway, dlb-control, dlb-ui).
# Static musl binaries (nothing to link against: no OpenSSL, protobuf compiled in Rust; ring
# and mimalloc compile their C sources with musl-gcc), on an empty base: nothing in the image
# but the binaries.
#
#   docker build -t dlb .
#   docker compose -f deploy/compose.yaml up
FROM rust:1.95-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl \
 && apt-get update && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
      --bin dlb --bin dlb-compute --bin dlb-gateway --bin dlb-control --bin dlb-ui \
 && mkdir /out \
 && cd target/x86_64-unknown-linux-musl/release \
 && cp dlb dlb-compute dlb-gateway dlb-control dlb-ui /out/

FROM scratch
COPY --from=build /out/ /usr/local/bin/
# dlb-control finds dlb-compute next to itself.
ENV PATH=/usr/local/bin
USER 65534:65534
# Compute, gateway, gateway metrics, control, dashboard.
EXPOSE 13001 12000 12002 12001 5000
ENTRYPOINT ["/usr/local/bin/dlb-gateway"]
