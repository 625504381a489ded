# keygate container image: `docker build -t keygate .`
# Runs `keygate serve --config /etc/keygate/docker.toml` as an unprivileged user; see
# docker-compose.yml for keygate + Redis + a demo upstream.

# --- build --------------------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src

# Dependencies first, against placeholder sources: this layer is reused until Cargo.toml or
# Cargo.lock change, so editing keygate's code does not rebuild every crate. (The test and
# bench stubs stay: Cargo.toml names tests/it/main.rs and the benches, and cargo wants every
# target it declares to exist before it builds any.)
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src tests/it benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs tests/it/main.rs \
 && for b in $(sed -n '/^\[\[bench\]\]/{n;s/^name = "\(.*\)"$/\1/p}' Cargo.toml); do \
      echo 'fn main() {}' > "benches/$b.rs"; done \
 && cargo build --release --locked \
 && rm -rf src

COPY src ./src
# Newer than the placeholder build, so cargo rebuilds keygate itself.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin keygate

# --- run ----------------------------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin keygate
COPY --from=build /src/target/release/keygate /usr/local/bin/keygate
COPY config/docker.toml /etc/keygate/docker.toml
# A directory keygate may write, for a SQLite store instead of Redis (the file and its `.lock`
# beside it): KEYGATE_STORE=sqlite:///data/keygate.db with a volume mounted at /data.
RUN mkdir /data && chown keygate:keygate /data
USER keygate:keygate
# 8080: proxy (data plane); 8081: admin API (publish it on loopback only).
EXPOSE 8080 8081
# keygate handles SIGTERM itself: stops accepting, drains in-flight requests, exits 0.
ENTRYPOINT ["keygate"]
CMD ["serve", "--config", "/etc/keygate/docker.toml"]
