# The Flux example's Job image (examples/flux/job.yaml): busybox (Debian's
# busybox-static), the static deploylock CLI and the pinned kubectl built
# static (hack/example-tools.sh kubectl-static), built locally by
# `hack/image.sh flux` as
#   ghcr.io/deploylock/deploylock-flux:0.1.0
# The rollout script itself comes from a ConfigMap (examples/flux/kustomization.yaml).
FROM scratch
COPY bin/busybox /bin/busybox
COPY bin/deploylock /usr/local/bin/deploylock
COPY bin/kubectl /usr/local/bin/kubectl
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
RUN ["/bin/busybox", "--install", "-s", "/bin"]
# kubectl keeps its discovery cache under $HOME.
RUN ["/bin/busybox", "mkdir", "-m", "1777", "/tmp"]
USER 65532:65532
ENV PATH=/usr/local/bin:/bin HOME=/tmp
ENTRYPOINT ["/bin/sh"]
