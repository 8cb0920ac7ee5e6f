"""deploy/gateway/ (issue 11): the InferencePool + endpoint-picker example is valid (built-in kinds against
Kubernetes' schemas, InferencePool and HTTPRoute against their CRDs' schemas in tests/crds/) and fits
together with deploy/ (selectors, ports, names) and with the metrics the server exports."""

from __future__ import annotations

import json
import shutil
import subprocess

import jsonschema
import pytest
import yaml

from prefixserve.config import Settings
from tests.paths import REPO_ROOT, TESTS_DIR
from tests.system.test_deploy_files import documents, kustomize, run, tool, with_components

GATEWAY = REPO_ROOT / "deploy" / "gateway"
CRDS = TESTS_DIR / "crds"


def gateway_objects() -> dict[tuple[str, str], dict]:
    return {
        (d["kind"], d["metadata"]["name"]): d
        for p in sorted(GATEWAY.glob("*.yaml"))
        if p.name != "kustomization.yaml"
        for d in documents(p)
    }


def base_objects() -> dict[tuple[str, str], dict]:
    return {
        (d["kind"], d["metadata"]["name"]): d
        for p in sorted((REPO_ROOT / "deploy").glob("*.yaml"))
        if p.name != "kustomization.yaml"
        for d in documents(p)
    }


def strict(schema: dict) -> dict:
    """The schema as `kubectl apply --validate=strict` applies it: unknown fields are errors (a structural
    schema otherwise prunes them silently), except where the CRD preserves unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    preserves = schema.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in schema and "additionalProperties" not in schema and not preserves:
        out["additionalProperties"] = False
    return out


@pytest.mark.parametrize(
    ("kind", "schema_file"), [("InferencePool", "inferencepool-v1.json"), ("HTTPRoute", "httproute-v1.json")]
)
def test_custom_resources_validate_against_their_crds(kind, schema_file):
    crd = json.loads((CRDS / schema_file).read_text())
    validator = jsonschema.Draft7Validator(strict(crd["openAPIV3Schema"]))
    found = [d for (k, _), d in gateway_objects().items() if k == kind]
    assert found, f"no {kind} in deploy/gateway"
    for obj in found:
        assert obj["apiVersion"] == f"{crd['group']}/{crd['version']}"
        validator.validate(obj)
    # The schema is strict enough to catch a mistake: a misspelt field is refused.
    broken = json.loads(json.dumps(found[0]))
    broken["spec"]["selektor"] = {}
    with pytest.raises(jsonschema.ValidationError, match="selektor"):
        validator.validate(broken)


def test_built_in_kinds_validate_against_the_kubernetes_schemas(tmp_path):
    builtin = [d for (k, _), d in gateway_objects().items() if k not in ("InferencePool", "HTTPRoute")]
    assert {d["kind"] for d in builtin} == {
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Service",
        "Deployment",
    }
    path = tmp_path / "builtin.yaml"
    path.write_text(yaml.safe_dump_all(builtin))
    from kubernetes_validate.utils import all_versions

    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", "-k", all_versions()[0], str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "ERROR" not in result.stdout + result.stderr, (
        result.stdout + result.stderr
    )


def test_the_pool_the_picker_and_the_route_fit_together():
    objects, base = gateway_objects(), base_objects()
    pool = objects["InferencePool", "prefixserve"]
    server = base["Deployment", "prefixserve"]["spec"]["template"]
    # The pool selects the server pods, on the port they serve (and /metrics) on.
    labels = server["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = server["spec"]["containers"]
    ports = {p["containerPort"] for p in container["ports"]}
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [8000] and 8000 in ports
    # The picker: its Service, its Deployment's labels and arguments, its config, its RBAC.
    ref = pool["spec"]["endpointPickerRef"]
    epp_service = objects["Service", ref["name"]]
    assert [p["port"] for p in epp_service["spec"]["ports"]] == [ref["port"]["number"]]
    epp = objects["Deployment", "prefixserve-epp"]["spec"]["template"]
    assert epp_service["spec"]["selector"].items() <= epp["metadata"]["labels"].items()
    assert not epp_service["spec"]["selector"].items() <= labels.items()  # never the server pods
    (picker,) = epp["spec"]["containers"]
    args = dict(zip(picker["args"][::2], picker["args"][1::2], strict=True))
    assert args["--pool-name"] == pool["metadata"]["name"] and args["--grpc-port"] == str(
        ref["port"]["number"]
    )
    config_volume = next(v for v in epp["spec"]["volumes"] if v["name"] == picker["volumeMounts"][0]["name"])
    config = yaml.safe_load(objects["ConfigMap", config_volume["configMap"]["name"]]["data"]["epp.yaml"])
    profile = {p["pluginRef"] for p in config["schedulingProfiles"][0]["plugins"]}
    assert profile == {p["type"] for p in config["plugins"]} - {"single-profile-handler"}
    assert "lora-affinity-scorer" in profile
    assert (
        epp["spec"]["serviceAccountName"] == objects["RoleBinding", "prefixserve-epp"]["subjects"][0]["name"]
    )
    # The route: OpenAI routes (adapter in `model`) to the pool, the rest to the Service; /metrics nowhere.
    route = objects["HTTPRoute", "prefixserve"]
    to_pool, to_service = route["spec"]["rules"]
    assert to_pool["backendRefs"] == [
        {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool["metadata"]["name"]}
    ]
    # The picker needs `model` in the body: only routes where it is required go through it.
    assert {m["path"]["value"] for m in to_pool["matches"]} == {"/v1/completions", "/v1/chat/completions"}
    assert to_service["backendRefs"][0]["name"] == "prefixserve"
    paths = {m["path"]["value"] for rule in route["spec"]["rules"] for m in rule["matches"]}
    assert not any("/metrics".startswith(p) and p != "/" for p in paths) and "/metrics" not in paths


@pytest.mark.external
def test_the_component_builds_with_deploy_and_names_adapters_plainly(tmp_path):
    """deploy/ with the gateway component on (with and without s3), built by kustomize as
    `kubectl apply -k deploy/` would: the base's objects, the pool, the picker and the route, with the
    ConfigMap patched; every built-in object valid against Kubernetes' schemas."""
    kustomization = yaml.safe_load((GATEWAY / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Component"
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in GATEWAY.glob("*.yaml") if p.name != "kustomization.yaml"}
    for components in (("gateway",), ("s3", "gateway")):
        tree = tmp_path / "-".join(components) / "deploy"
        shutil.copytree(REPO_ROOT / "deploy", tree)
        top = tree / "kustomization.yaml"
        top.write_text(with_components(top.read_text(), *components))
        built = run(*kustomize(), str(tree))
        assert built.returncode == 0, built.stderr
        objects = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(built.stdout)}
        assert set(gateway_objects()) <= set(objects) and ("Deployment", "prefixserve") in objects
        config = objects["ConfigMap", "prefixserve"]["data"]
        assert config["PREFIXSERVE_METRICS_ADAPTER_NAMES"] == "plain"
        names = {k.removeprefix("PREFIXSERVE_").lower() for k in config if k.startswith("PREFIXSERVE_")}
        assert names <= set(Settings.model_fields), names - set(Settings.model_fields)
        builtin = [d for (kind, _), d in objects.items() if kind not in ("InferencePool", "HTTPRoute")]
        path = tree.parent / "built.yaml"
        path.write_text(yaml.safe_dump_all(builtin))
        result = run(tool("kubernetes-validate"), "--strict", "--quiet", str(path))
        assert result.returncode == 0 and "ERROR" not in result.stdout + result.stderr, (
            result.stdout + result.stderr
        )
