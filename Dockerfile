# syntax=docker/dockerfile:1
# Multi-stage build of a static beacon binary on a non-root distroless base.
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/beacon ./cmd/beacon \
 && mkdir -p /out/data

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/beacon /beacon
COPY --from=build --chown=65532:65532 /out/data /data
# Inside a container the listeners must face the container network, so
# Beacon starts only once authentication is configured (docs/security.md):
# provision devices first (docker run ... beacon devices add NAME), mount a
# config with JWT keys or rules, or set BEACON_AUTH_ALLOW_ANONYMOUS=true.
ENV BEACON_MQTT_ADDR=0.0.0.0:1883 \
    BEACON_HTTP_ADDR=0.0.0.0:8080 \
    BEACON_STORAGE_DIR=/data
VOLUME /data
EXPOSE 1883 8883 8080
USER nonroot:nonroot
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 CMD ["/beacon", "healthcheck"]
ENTRYPOINT ["/beacon"]
CMD ["serve"]
