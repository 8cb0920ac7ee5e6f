"""System tests: several processes and tools outside Python: replicas behind HAProxy, the console in
Chromium, the S3 store against SeaweedFS, lm-evaluation-harness against a server, and the deployment files
(Dockerfile, Kubernetes manifests and kustomizations, compose, HAProxy configuration).

A missing tool fails its test with a message saying what to install (scripts/setup-dev.sh), never skips it.
Tests that start such a tool (haproxy, chromium, SeaweedFS, hadolint, kustomize) are marked `external`:
by module or test here, and every user of the s3_server fixture by tests/conftest.py (`slow` too).

Fixtures: none of this layer's own; s3_server and s3_bucket come from tests/conftest.py.
"""
