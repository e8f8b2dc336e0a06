# deploylock: the controller and the CLI in one small image,
#   ghcr.io/deploylock/deploylock:0.1.0
# (the chart's default image, the one the examples run).
#
# This is the release build's runtime stage: nothing but the statically linked
# release binaries and the CA roots, so it builds anywhere without pulling a
# base image. `make image` prepares the build context (hack/image.sh: a musl
# `cargo build --release`, the host's CA bundle) and builds it with buildah;
# with Docker: `make image IMAGE_BUILDER=docker`. The context holds:
#   bin/deploylock-controller, bin/deploylock, bin/kubectl-deploylock
#   ca-certificates.crt
FROM scratch
COPY bin/ /usr/local/bin/
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
# Non-root, numeric (a runAsNonRoot check needs a number: there is no /etc/passwd).
USER 65532:65532
EXPOSE 8080
ENV PATH=/usr/local/bin
ENTRYPOINT ["/usr/local/bin/deploylock-controller"]
