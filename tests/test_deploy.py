"""Static validation of deploy/: Kubernetes manifests, the Compose file, the Dockerfiles, Falco's config.

Nothing here runs a container or talks to a cluster (neither exists in CI); the files are checked
against the schemas their tools use and against the invariants the pipeline depends on:

* Kubernetes: the kustomize base is rendered by a small renderer for the subset of kustomize it uses
  (resources, namespace, labels, configMapGenerator) and every object is validated against the
  Kubernetes OpenAPI schemas bundled in the ``kubernetes-validate`` package (strict: unknown fields are
  errors), for the oldest and the newest Kubernetes version we support. When ``kubectl`` or
  ``kustomize`` is installed, the real renderer's output (base and example overlay) is validated too.
  Then cross-references (ConfigMaps, Secrets, selectors, ports, probes) and the pod-security
  "restricted" profile are checked.
* Compose: validated against the Compose Specification JSON schema (shipped offline in the
  ``check-jsonschema`` package), then the pipeline's invariants (one-shot topic creation before every
  client, health checks, secrets as files, only the proxy exposed, one spool volume per ingest).
* Dockerfiles: multi-stage, pinned bases, non-root USER, HEALTHCHECK, every COPY source present and
  not excluded by the Dockerfile's .dockerignore.
* The role configurations under deploy/ are decoded with the roles' own msgspec schemas (unknown keys
  are errors there), so a renamed setting in ingest or enrich breaks this test, not a deployment.
* The topic script runs against stub Kafka tools, offline.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import http.server
import importlib
import importlib.resources
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from falco_gitlab import contract

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
BASE = K8S / "base"
OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
DOCKER = DEPLOY / "docker"
TOPICS_SCRIPT = BASE / "kafka-topics" / "create-topics.sh"

# Oldest supported (native sidecar containers are on by default from 1.29) and newest bundled schema.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())

PLUGIN_NAME = "gitlabkafka"
PLUGIN_LIBRARY = "/usr/share/falco/plugins/libgitlabkafka.so"
FALCO_WEB_PORT = 8765
FALCO_YAMLS = sorted(DEPLOY.rglob("falco.yaml"))
INGEST_TOMLS = sorted(DEPLOY.rglob("ingest.toml"))
ENRICH_TOMLS = sorted(DEPLOY.rglob("enrich.toml"))
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
TOPICS = (contract.TOPIC_RAW, contract.TOPIC_ENRICHED, contract.TOPIC_DLQ)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def kafka_version() -> str:
    pom = (ROOT / "falco_gitlab" / "kafka" / "pom.xml").read_text(encoding="utf-8")
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom)
    assert match, "falco_gitlab/kafka/pom.xml has no <kafka.version>"
    return match.group(1)


# ---------------------------------------------------------------------------------------------------
# A renderer for the subset of kustomize the base uses
# ---------------------------------------------------------------------------------------------------

KUSTOMIZE_KEYS_RENDERED = {"apiVersion", "kind", "namespace", "labels", "resources", "configMapGenerator"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def _read_kustomization(directory: Path) -> dict[str, Any]:
    data = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _generated_configmap(gen: dict[str, Any], directory: Path) -> dict[str, Any]:
    data: dict[str, str] = {}
    for entry in gen.get("files", []):
        key, _, path = entry.partition("=") if "=" in entry else (Path(entry).name, "", entry)
        data[key] = (directory / path).read_text(encoding="utf-8")
    for literal in gen.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    name = gen["name"]
    if not gen.get("options", {}).get("disableNameSuffixHash"):
        # Not kustomize's hash function, but the same property: the name changes with the content.
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]
        name = f"{name}-{digest}"
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


def _add_labels(obj: dict[str, Any], pairs: dict[str, str], templates: bool, selectors: bool) -> None:
    obj.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
    spec = obj.get("spec", {})
    if templates and "template" in spec:
        spec["template"].setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
    if selectors and isinstance(spec.get("selector"), dict):
        spec["selector"].setdefault("matchLabels", {}).update(pairs)


def render_kustomization(directory: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """(objects, generated ConfigMap name -> name with hash). Refuses features it does not implement."""
    kust = _read_kustomization(directory)
    unsupported = set(kust) - KUSTOMIZE_KEYS_RENDERED
    assert not unsupported, (
        f"{rel(directory)}/kustomization.yaml uses {sorted(unsupported)}, which tests/test_deploy.py's "
        "renderer does not implement: extend the renderer, or keep those in overlays"
    )
    objects: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for entry in kust.get("resources", []):
        path = directory / entry
        if path.is_dir():
            sub_objects, sub_names = render_kustomization(path)
            objects += sub_objects
            names.update(sub_names)
        else:
            objects += load_yaml_docs(path)
    for gen in kust.get("configMapGenerator", []):
        generated = _generated_configmap(gen, directory)
        names[gen["name"]] = generated["metadata"]["name"]
        objects.append(generated)
    # Generated names replace references, as kustomize's name-reference transformer does.
    for obj in objects:
        _rename_configmap_refs(obj, names)
    for block in kust.get("labels", []):
        for obj in objects:
            _add_labels(obj, block["pairs"], bool(block.get("includeTemplates")),
                        bool(block.get("includeSelectors")))
    if "namespace" in kust:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kust["namespace"]
    return objects, names


def _rename_configmap_refs(obj: dict[str, Any], names: dict[str, str]) -> None:
    spec = pod_spec(obj)
    if spec is None:
        return
    for volume in spec.get("volumes", []):
        if "configMap" in volume and volume["configMap"]["name"] in names:
            volume["configMap"]["name"] = names[volume["configMap"]["name"]]
    for container in all_containers(spec):
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef")
            if ref and ref["name"] in names:
                ref["name"] = names[ref["name"]]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj.get("kind") in WORKLOAD_KINDS:
        spec: dict[str, Any] = obj["spec"]["template"]["spec"]
        return spec
    if obj.get("kind") == "CronJob":
        spec = obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        return spec
    return None


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"no {kind}/{name} in the rendered manifests")


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def base_name(name: str, names: dict[str, str]) -> str:
    for plain, generated in names.items():
        if generated == name:
            return plain
    return name


BASE_OBJECTS, BASE_GENERATED = render_kustomization(BASE)


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render_with_kustomize(directory: Path) -> list[dict[str, Any]]:
    command = kustomize_command()
    assert command is not None
    done = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, f"{' '.join(command)} {rel(directory)} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def object_id(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


# ---------------------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------------------


def _kustomizations() -> list[Path]:
    return [BASE, *OVERLAYS]


@pytest.mark.parametrize("directory", _kustomizations(), ids=lambda p: rel(p))
def test_kustomization_references_exist_inside_the_root(directory: Path) -> None:
    kust = _read_kustomization(directory)
    assert kust.get("apiVersion") == "kustomize.config.k8s.io/v1beta1"
    assert kust.get("kind") == "Kustomization"
    referenced: list[str] = list(kust.get("resources", []))
    for gen in kust.get("configMapGenerator", []) + kust.get("secretGenerator", []):
        referenced += [entry.split("=", 1)[-1] for entry in gen.get("files", [])]
    referenced += [p["path"] for p in kust.get("patches", []) if "path" in p]
    for entry in referenced:
        path = (directory / entry).resolve()
        assert path.exists(), f"{rel(directory)}/kustomization.yaml references missing {entry}"
        if directory == BASE:
            # kustomize's default load restrictor: files must lie inside the kustomization root.
            assert path.is_relative_to(directory.resolve()), f"{entry} is outside {rel(directory)}"


def test_every_base_file_is_used() -> None:
    kust = _read_kustomization(BASE)
    used = {(BASE / r).resolve() for r in kust["resources"]}
    for gen in kust["configMapGenerator"]:
        used |= {(BASE / entry.split("=", 1)[-1]).resolve() for entry in gen.get("files", [])}
    on_disk = {p.resolve() for p in BASE.rglob("*") if p.is_file() and p.name != "kustomization.yaml"}
    unused = sorted(rel(p) for p in on_disk - used)
    assert not unused, f"files in the base that kustomization.yaml does not use: {unused}"


def _validation_cases() -> Iterator[Any]:
    for obj in BASE_OBJECTS:
        for version in K8S_VERSIONS:
            yield pytest.param(obj, version, id=f"{object_id(obj)}@{version}")


@pytest.mark.parametrize(("obj", "version"), list(_validation_cases()))
def test_base_object_matches_kubernetes_schema(obj: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{object_id(obj)} against Kubernetes {exc.version}: {path}: {exc.message}")


def test_base_has_the_expected_objects() -> None:
    ids = {object_id(o) for o in BASE_OBJECTS}
    expected = {
        "Namespace/falco-gitlab",
        "StatefulSet/ingest", "Service/ingest", "Service/ingest-headless",
        "HorizontalPodAutoscaler/ingest", "PodDisruptionBudget/ingest", "NetworkPolicy/ingest",
        "Secret/ingest-tokens",
        "Deployment/enrich", "PodDisruptionBudget/enrich", "NetworkPolicy/enrich", "Secret/geoipupdate",
        "Deployment/falco", "PodDisruptionBudget/falco", "NetworkPolicy/falco",
        "Job/kafka-topics", "NetworkPolicy/kafka-topics",
        "NetworkPolicy/default-deny", "NetworkPolicy/allow-dns",
    }
    assert expected <= ids, f"missing: {sorted(expected - ids)}"
    for obj in BASE_OBJECTS:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "falco-gitlab", object_id(obj)


@pytest.mark.skipif(kustomize_command() is None, reason="neither kustomize nor kubectl is installed")
@pytest.mark.parametrize("directory", _kustomizations(), ids=lambda p: rel(p))
def test_real_kustomize_render_validates(directory: Path) -> None:
    objects = render_with_kustomize(directory)
    for obj in objects:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{rel(directory)}: {object_id(obj)} against {exc.version}: {path}: "
                            f"{exc.message}")
    if directory == BASE:
        # The test renderer and kustomize agree on what the base contains.
        strip = re.compile(r"-[a-z0-9]{10}$")
        ours = {strip.sub("", object_id(o)) for o in BASE_OBJECTS}
        theirs = {strip.sub("", object_id(o)) for o in objects}
        assert ours == theirs
    check_cross_references(objects)


def check_cross_references(objects: list[dict[str, Any]]) -> None:
    configmaps = {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"}
    secrets = {o["metadata"]["name"] for o in objects if o["kind"] == "Secret"}
    workloads = [o for o in objects if pod_spec(o) is not None]
    for obj in workloads:
        spec = pod_spec(obj)
        assert spec is not None
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, f"{object_id(obj)}: {volume}"
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, f"{object_id(obj)}: {volume}"
        declared = {v["name"] for v in spec.get("volumes", [])}
        if obj["kind"] == "StatefulSet":
            declared |= {c["metadata"]["name"] for c in obj["spec"].get("volumeClaimTemplates", [])}
        for container in all_containers(spec):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in declared, f"{object_id(obj)}/{container['name']}: {mount['name']}"
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps
            ports = {p["name"] for p in container.get("ports", []) if "name" in p}
            for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = container.get(probe_name, {})
                port = probe.get("httpGet", {}).get("port")
                if isinstance(port, str):
                    assert port in ports, f"{object_id(obj)}/{container['name']} {probe_name} port {port}"
    for svc in (o for o in objects if o["kind"] == "Service"):
        targets = [w for w in workloads
                   if labels_match(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        assert targets, f"{object_id(svc)} selects no pods"
        for port in svc["spec"]["ports"]:
            if isinstance(port.get("targetPort"), str):
                names = {p.get("name") for w in targets for c in pod_spec(w)["containers"]  # type: ignore[index]
                         for p in c.get("ports", [])}
                assert port["targetPort"] in names, f"{object_id(svc)}: targetPort {port['targetPort']}"
    for obj in objects:
        if obj["kind"] in ("PodDisruptionBudget", "NetworkPolicy"):
            selector = (obj["spec"]["selector"] if obj["kind"] == "PodDisruptionBudget"
                        else obj["spec"]["podSelector"]).get("matchLabels", {})
            if selector:
                assert any(labels_match(selector, w["spec"]["template"]["metadata"]["labels"])
                           for w in workloads), f"{object_id(obj)} selects no pods"
        if obj["kind"] == "HorizontalPodAutoscaler":
            ref = obj["spec"]["scaleTargetRef"]
            find(objects, ref["kind"], ref["name"])
        if obj["kind"] == "StatefulSet":
            governing = find(objects, "Service", obj["spec"]["serviceName"])
            assert governing["spec"].get("clusterIP") == "None"
        if obj["kind"] in ("Deployment", "StatefulSet"):
            assert labels_match(obj["spec"]["selector"]["matchLabels"],
                                obj["spec"]["template"]["metadata"]["labels"]), object_id(obj)


def test_base_cross_references() -> None:
    check_cross_references(BASE_OBJECTS)


@pytest.mark.parametrize("obj", [o for o in BASE_OBJECTS if pod_spec(o) is not None], ids=object_id)
def test_pods_meet_the_restricted_pod_security_profile(obj: dict[str, Any]) -> None:
    spec = pod_spec(obj)
    assert spec is not None
    pod_ctx = spec.get("securityContext", {})
    assert pod_ctx.get("runAsNonRoot") is True
    assert pod_ctx.get("runAsUser", 0) != 0
    assert pod_ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    assert spec.get("automountServiceAccountToken") is False
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key)
    for volume in spec.get("volumes", []):
        assert set(volume) - {"name"} <= {"configMap", "secret", "emptyDir", "persistentVolumeClaim",
                                          "projected", "downwardAPI"}, volume
    for container in all_containers(spec):
        where = f"{object_id(obj)}/{container['name']}"
        ctx = container.get("securityContext", {})
        assert ctx.get("allowPrivilegeEscalation") is False, where
        assert ctx.get("readOnlyRootFilesystem") is True, where
        assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not ctx.get("privileged"), where
        assert not ctx.get("capabilities", {}).get("add"), where
        resources = container.get("resources", {})
        assert {"cpu", "memory"} <= set(resources.get("requests", {})), f"{where}: requests"
        assert "memory" in resources.get("limits", {}), f"{where}: memory limit"
        image = container["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{where}: {image}"


def test_long_running_containers_have_probes() -> None:
    for name, kind in (("ingest", "StatefulSet"), ("enrich", "Deployment"), ("falco", "Deployment")):
        spec = pod_spec(find(BASE_OBJECTS, kind, name))
        assert spec is not None
        container = spec["containers"][0]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert probe in container, f"{kind}/{name}: {probe}"


def test_ingest_is_a_statefulset_with_a_spool_claim_that_fits_the_config() -> None:
    sts = find(BASE_OBJECTS, "StatefulSet", "ingest")
    spec = pod_spec(sts)
    assert spec is not None
    config = tomllib.loads((BASE / "ingest" / "ingest.toml").read_text(encoding="utf-8"))
    container = spec["containers"][0]
    assert container["args"] == ["ingest", "--config", "/etc/falco-gitlab/ingest.toml"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["spool"]["mountPath"] == config["spool"]["dir"]
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "spool"
    size = parse_quantity(claim["spec"]["resources"]["requests"]["storage"])
    assert size >= config["server"]["workers"] * config["spool"]["max_bytes"]
    retention = sts["spec"]["persistentVolumeClaimRetentionPolicy"]
    assert retention == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    # Token files live where the Secret is mounted, one key per file name.
    secret = find(BASE_OBJECTS, "Secret", "ingest-tokens")
    token_dir = mounts["tokens"]["mountPath"]
    for dest in config["destinations"]:
        assert "tokens" not in dest, "tokens must come from files, never literals in committed config"
        for token_file in dest["token_files"]:
            directory, _, key = token_file.rpartition("/")
            assert directory == token_dir and key in secret["stringData"], token_file
    # Graceful stop: preStop sleep + ingest's two shutdown phases (requests in flight, then the final
    # flush, each up to shutdown_timeout_s) fit in the grace period.
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + 2 * config["server"]["shutdown_timeout_s"]
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
    assert port == config["server"]["port"]


def parse_quantity(text: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(text[: -len(suffix)]) * factor
    return int(text)


def test_placeholder_secrets_are_refused_by_the_services() -> None:
    for name in ("ingest-tokens", "geoipupdate"):
        secret = find(BASE_OBJECTS, "Secret", name)
        assert "data" not in secret, f"Secret/{name}: only placeholder stringData belongs in git"
        for key, value in secret["stringData"].items():
            assert value == "REPLACE-ME", f"Secret/{name}.{key} must stay a placeholder"
    # ingest refuses tokens shorter than GitLab's 16 characters: a forgotten placeholder fails loudly.
    ingest_config = pytest.importorskip("ingest.config")
    assert len("REPLACE-ME") < ingest_config.MIN_TOKEN_LENGTH


def test_hpa_pdb_and_replicas_are_consistent() -> None:
    hpa = find(BASE_OBJECTS, "HorizontalPodAutoscaler", "ingest")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "ingest"}
    assert hpa["spec"]["minReplicas"] >= 2
    for obj in BASE_OBJECTS:
        if obj["kind"] == "PodDisruptionBudget":
            assert obj["apiVersion"] == "policy/v1"
    settings = find(BASE_OBJECTS, "ConfigMap", "kafka-topics-settings")["data"]
    partitions = int(settings["PARTITIONS"])
    for name in ("enrich", "falco"):
        replicas = find(BASE_OBJECTS, "Deployment", name)["spec"]["replicas"]
        assert 1 <= replicas <= partitions, f"{name}: {replicas} replicas for {partitions} partitions"
    assert int(settings["REPLICATION_FACTOR"]) == 3 and int(settings["MIN_INSYNC_REPLICAS"]) == 2


def test_falco_deployment_is_plugin_only() -> None:
    deployment = find(BASE_OBJECTS, "Deployment", "falco")
    spec = pod_spec(deployment)
    assert spec is not None
    container = spec["containers"][0]
    args = container["args"]
    assert args[args.index("--disable-source") + 1] == "syscall"
    assert args[args.index("-c") + 1] == "/etc/falco/falco.yaml"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/falco/falco.yaml"]["subPath"] == "falco.yaml"
    config = yaml.safe_load((BASE / "falco" / "falco.yaml").read_text(encoding="utf-8"))
    assert any(path.startswith("/etc/falco/rules.local.d/") for path in config["rules_files"])
    assert "/etc/falco/rules.local.d" in mounts
    web = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
    assert web == config["webserver"]["listen_port"]
    assert container["livenessProbe"]["httpGet"]["path"] == config["webserver"]["k8s_healthz_endpoint"]


def _policy(name: str) -> dict[str, Any]:
    return find(BASE_OBJECTS, "NetworkPolicy", name)


def test_network_policies_default_deny_and_only_the_load_balancer_reaches_ingest() -> None:
    deny = _policy("default-deny")
    assert deny["spec"]["podSelector"] == {} and set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    ingest = _policy("ingest")
    rules = ingest["spec"]["ingress"]
    assert rules, "ingest must admit its load balancer"
    def admits_lb(peer: dict[str, Any]) -> bool:
        labels = peer.get("namespaceSelector", {}).get("matchLabels", {})
        return bool(labels.get("falco-gitlab/ingest-access") == "allowed")

    lb_rules = [r for r in rules if any(admits_lb(peer) for peer in r["from"])]
    assert lb_rules, "no rule admits the load balancer's namespace"
    for rule in rules:
        assert rule.get("from"), "an ingress rule without 'from' admits everyone"
        for peer in rule["from"]:
            assert "ipBlock" not in peer or peer["ipBlock"]["cidr"] not in ("0.0.0.0/0", "::/0")
            # Only namespace-level peers: no podSelector: {} wildcards within the namespace.
            assert "podSelector" not in peer
    sts = find(BASE_OBJECTS, "StatefulSet", "ingest")
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert labels_match(ingest["spec"]["podSelector"]["matchLabels"], pod_labels)
    for name in ("ingest", "enrich", "falco", "kafka-topics"):
        egress = _policy(name)["spec"]["egress"]
        ports = {p["port"] for rule in egress for p in rule.get("ports", [])}
        assert 9092 in ports, f"NetworkPolicy/{name} must allow Kafka"


def test_one_bootstrap_address_everywhere_in_the_base() -> None:
    ingest = tomllib.loads((BASE / "ingest" / "ingest.toml").read_text(encoding="utf-8"))
    enrich = tomllib.loads((BASE / "enrich" / "enrich.toml").read_text(encoding="utf-8"))
    falco = yaml.safe_load((BASE / "falco" / "falco.yaml").read_text(encoding="utf-8"))
    settings = find(BASE_OBJECTS, "ConfigMap", "kafka-topics-settings")["data"]
    plugin = falco["plugins"][0]["init_config"]
    addresses = {ingest["kafka"]["bootstrap_servers"], enrich["kafka"]["bootstrap_servers"],
                 settings["BOOTSTRAP_SERVERS"], plugin_brokers(plugin)}
    assert len(addresses) == 1, addresses


def plugin_brokers(init_config: dict[str, Any]) -> str:
    for key in ("brokers", "bootstrap_servers"):
        if key in init_config:
            value = init_config[key]
            return ",".join(value) if isinstance(value, list) else str(value)
    raise AssertionError(f"no broker address in init_config {init_config}")


def test_enrich_geoip_sidecar_feeds_the_configured_databases() -> None:
    enrich = tomllib.loads((BASE / "enrich" / "enrich.toml").read_text(encoding="utf-8"))
    spec = pod_spec(find(BASE_OBJECTS, "Deployment", "enrich"))
    assert spec is not None
    sidecar = next(c for c in spec["initContainers"] if c["name"] == "geoipupdate")
    assert sidecar["restartPolicy"] == "Always", "a native sidecar keeps the databases current"
    probe = " ".join(sidecar["startupProbe"]["exec"]["command"])
    geo_mount = next(m["mountPath"] for m in sidecar["volumeMounts"] if m["name"] == "geoip")
    for key in ("city_db", "asn_db"):
        path = enrich["geoip"][key]
        assert path.startswith(geo_mount + "/") and path in probe, key
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    assert env["GEOIPUPDATE_DB_DIR"] == geo_mount
    for path in (enrich["geoip"]["city_db"], enrich["geoip"]["asn_db"]):
        edition = Path(path).stem
        assert edition in env["GEOIPUPDATE_EDITION_IDS"].split()
    main = spec["containers"][0]
    metrics = next(p["containerPort"] for p in main["ports"] if p["name"] == "metrics")
    assert metrics == enrich["metrics"]["port"] and enrich["metrics"]["host"] == "0.0.0.0"
    shutdown = enrich.get("processing", {}).get("shutdown_timeout_s", 30.0)
    assert spec["terminationGracePeriodSeconds"] > shutdown


def test_topic_job_runs_the_shared_script_with_the_pinned_kafka_image() -> None:
    job = find(BASE_OBJECTS, "Job", "kafka-topics")
    spec = pod_spec(job)
    assert spec is not None
    container = spec["containers"][0]
    assert container["image"] == f"apache/kafka:{kafka_version()}"
    script = find(BASE_OBJECTS, "ConfigMap", "kafka-topics-script")
    assert script["data"]["create-topics.sh"] == TOPICS_SCRIPT.read_text(encoding="utf-8")
    assert container["command"][-1] == "/opt/falco-gitlab/create-topics.sh"


# ---------------------------------------------------------------------------------------------------
# Role configurations: decoded with the roles' own schemas
# ---------------------------------------------------------------------------------------------------


def _role_schema(module: str, attribute: str) -> Any:
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"{module}.{attribute} is not available: {exc}")


@pytest.mark.parametrize("path", INGEST_TOMLS, ids=rel)
def test_ingest_configs_decode_with_the_ingest_schema(path: Path) -> None:
    from falco_gitlab.config import load_config

    schema = _role_schema("ingest.config", "IngestConfig")
    prefix = _role_schema("ingest.config", "ENV_PREFIX")
    config = load_config(schema, path, prefix, environ={})
    assert config.kafka.topic == contract.TOPIC_RAW and config.kafka.dlq_topic == contract.TOPIC_DLQ
    assert config.destinations, "at least one destination"
    for dest in config.destinations:
        assert not dest.tokens and dest.token_files, f"{dest.name}: tokens only from files"
    assert config.spool.max_bytes >= 2 * config.server.max_body_bytes
    assert config.spool.fsync is True


@pytest.mark.parametrize("path", ENRICH_TOMLS, ids=rel)
def test_enrich_configs_decode_with_the_enrich_schema(path: Path) -> None:
    from falco_gitlab.config import load_config

    schema = _role_schema("enrich.config", "EnrichConfig")
    prefix = _role_schema("enrich.config", "ENV_PREFIX")
    config = load_config(schema, path, prefix, environ={})
    kafka = config.kafka
    assert (kafka.input_topic, kafka.output_topic, kafka.dlq_topic) == TOPICS
    assert config.metrics.port > 0 and config.metrics.host == "0.0.0.0"


def test_message_size_limits_line_up() -> None:
    """GitLab's 25 MB bodies pass every hop: proxy, ingest, topics, enrich."""
    topic_limit = int(find(BASE_OBJECTS, "ConfigMap", "kafka-topics-settings")["data"]["MAX_MESSAGE_BYTES"])
    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert int(compose["services"]["kafka-init"]["environment"]["MAX_MESSAGE_BYTES"]) == topic_limit
    assert int(compose["services"]["kafka"]["environment"]["KAFKA_MESSAGE_MAX_BYTES"]) >= topic_limit
    nginx = (COMPOSE_DIR / "config" / "nginx.conf").read_text(encoding="utf-8")
    proxy_limit = parse_quantity(re.search(r"client_max_body_size\s+(\d+)m;", nginx).group(1) + "Mi")  # type: ignore[union-attr]
    for path in INGEST_TOMLS:
        server = tomllib.loads(path.read_text(encoding="utf-8"))["server"]
        kafka = tomllib.loads(path.read_text(encoding="utf-8"))["kafka"]
        producer = kafka.get("max_request_size") or server["max_body_bytes"] + 65_536
        assert server["max_body_bytes"] >= 25 * 1000 * 1000, f"{rel(path)}: GitLab sends up to 25 MB"
        assert producer <= topic_limit, rel(path)
        if "compose" in path.parts:
            assert server["max_body_bytes"] <= proxy_limit
    for path in ENRICH_TOMLS:
        kafka = tomllib.loads(path.read_text(encoding="utf-8"))["kafka"]
        assert 25 * 1000 * 1000 < kafka["max_request_size"] <= topic_limit, rel(path)
        # A raw record as large as the topic allows is fetched whole.
        fetch = kafka["max_partition_fetch_bytes"]
        assert topic_limit <= fetch <= kafka.get("fetch_max_bytes", 52_428_800), rel(path)


# ---------------------------------------------------------------------------------------------------
# Falco configuration
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", FALCO_YAMLS, ids=rel)
def test_falco_yaml_is_plugin_only(path: Path) -> None:
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert config["engine"]["kind"] == "nodriver"
    assert config["load_plugins"] == [PLUGIN_NAME]
    assert [p["name"] for p in config["plugins"]] == [PLUGIN_NAME]
    plugin = config["plugins"][0]
    assert plugin["library_path"] == PLUGIN_LIBRARY
    init = plugin["init_config"]
    assert isinstance(init, dict), "init_config as a YAML map (Falco hands it to the plugin as JSON)"
    assert init.get("topic") == contract.TOPIC_ENRICHED
    plugin_brokers(init)
    assert isinstance(plugin.get("open_params", ""), str)
    assert config["json_output"] is True
    assert config["stdout_output"]["enabled"] is True
    assert config["rules_files"][0] == "/etc/falco/rules.d/gitlab.yaml"
    assert config["watch_config_files"] is False
    assert config["webserver"]["enabled"] is True
    assert config["webserver"]["listen_port"] == FALCO_WEB_PORT
    assert config["syslog_output"]["enabled"] is False


@pytest.mark.parametrize("path", FALCO_YAMLS, ids=rel)
def test_plugin_settings_pass_the_plugins_own_checks(path: Path) -> None:
    """init_config and open_params as the plugin parses them in init/open (unknown keys are errors)."""
    plugin_config = _role_schema("falco_source.config", "parse_config")
    parse_open_params = _role_schema("falco_source.params", "parse_open_params")
    plugin = yaml.safe_load(path.read_text(encoding="utf-8"))["plugins"][0]
    config = plugin_config(json.dumps(plugin["init_config"]))
    assert config.topic == contract.TOPIC_ENRICHED
    topic_limit = int(find(BASE_OBJECTS, "ConfigMap", "kafka-topics-settings")["data"]["MAX_MESSAGE_BYTES"])
    assert config.max_event_size >= topic_limit, "a record the topic accepts must fit a Falco event"
    assert parse_open_params(plugin["open_params"]).mode == "live"


# ---------------------------------------------------------------------------------------------------
# Compose
# ---------------------------------------------------------------------------------------------------

COMPOSE = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose's ${VAR:-default}, resolved to the default (the committed behaviour)."""
    if isinstance(value, str):
        return _INTERPOLATION.sub(lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def compose_schema() -> dict[str, Any]:
    try:
        vendor = importlib.resources.files("check_jsonschema") / "builtin_schemas" / "vendor"
        text = (vendor / "compose-spec.json").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        pytest.fail(f"the Compose Specification schema ships with check-jsonschema (test extra): {exc}")
    schema: dict[str, Any] = json.loads(text)
    return schema


def test_compose_file_matches_the_compose_specification() -> None:
    validator = jsonschema.Draft202012Validator(compose_schema())
    errors = sorted(validator.iter_errors(COMPOSE), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_schema_catches_mistakes() -> None:
    """The schema is not vacuous: a typo and a bad depends_on condition are rejected."""
    validator = jsonschema.Draft202012Validator(compose_schema())
    broken = json.loads(json.dumps(COMPOSE))
    broken["services"]["kafka"]["helthcheck"] = {}
    broken["services"]["proxy"]["depends_on"]["ingest-1"]["condition"] = "service_ready"
    assert len(list(validator.iter_errors(broken))) >= 2


def test_compose_services_are_complete() -> None:
    expected = {"kafka", "kafka-init", "ingest-1", "ingest-2", "proxy", "enrich", "falco", "geoipupdate"}
    assert expected <= set(SERVICES)
    for name, service in SERVICES.items():
        assert "image" in service or "build" in service, name
        image = interpolate(service.get("image", ""))
        assert image and ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{name}: {image}"
        for dependency in service.get("depends_on", {}):
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
        for secret in service.get("secrets", []):
            source = secret if isinstance(secret, str) else secret["source"]
            assert source in COMPOSE["secrets"], f"{name}: secret {source} is not defined"
        for config in service.get("configs", []):
            assert config["source"] in COMPOSE["configs"], f"{name}: config {config['source']}"
        for network in service.get("networks", []):
            assert network in COMPOSE["networks"], f"{name}: network {network}"
        if name != "kafka-init" and "profiles" not in service:
            assert "healthcheck" in service, f"{name}: long-running services need a health check"
            assert service.get("restart") == "unless-stopped", name
    for name, config in COMPOSE["configs"].items():
        assert (COMPOSE_DIR / config["file"]).exists(), f"config {name}: {config['file']} is missing"


def test_compose_topics_are_created_once_before_any_client() -> None:
    init = SERVICES["kafka-init"]
    assert init["restart"] == "no"
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert "/create-topics.sh" in " ".join(init["entrypoint"])
    kafka_image = f"apache/kafka:{kafka_version()}"
    assert interpolate(init["image"]) == interpolate(SERVICES["kafka"]["image"]) == kafka_image
    env = interpolate(init["environment"])
    assert int(env["REPLICATION_FACTOR"]) == 1 and int(env["MIN_INSYNC_REPLICAS"]) == 1
    assert int(env["PARTITIONS"]) >= int(interpolate(SERVICES["enrich"]["deploy"]["replicas"]))
    for client in ("ingest-1", "ingest-2", "enrich", "falco"):
        assert SERVICES[client]["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    kafka_env = SERVICES["kafka"]["environment"]
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller", "KRaft, no ZooKeeper"
    assert kafka_env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert kafka_env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == 1, "enrich uses transactions"


def test_compose_only_the_proxy_is_exposed() -> None:
    for name, service in SERVICES.items():
        for port in interpolate(service.get("ports", [])):
            text = str(port)
            if name == "proxy" and text.endswith(":8443"):
                continue
            assert text.startswith("127.0.0.1:"), f"{name} publishes {text} beyond loopback"
    for name in ("ingest-1", "ingest-2"):
        assert "ports" not in SERVICES[name], f"{name} must only be reachable through the proxy"


def test_compose_ingest_replicas_each_have_their_own_spool() -> None:
    config = tomllib.loads((COMPOSE_DIR / "config" / "ingest.toml").read_text(encoding="utf-8"))
    volumes = []
    for name in ("ingest-1", "ingest-2"):
        service = SERVICES[name]
        assert service["command"] == ["ingest", "--config", "/etc/falco-gitlab/ingest.toml"]
        (volume,) = service["volumes"]
        source, target = volume.split(":")
        assert target == config["spool"]["dir"]
        assert source in COMPOSE["volumes"]
        volumes.append(source)
    assert len(set(volumes)) == 2, "two ingest processes must never share a spool"
    for name in ("ingest-1", "ingest-2"):
        grace = int(SERVICES[name]["stop_grace_period"].rstrip("s"))
        assert grace > 2 * config["server"]["shutdown_timeout_s"], name
    nginx = (COMPOSE_DIR / "config" / "nginx.conf").read_text(encoding="utf-8")
    for name in ("ingest-1", "ingest-2"):
        assert f"server {name}:{config['server']['port']}" in nginx
    # ingest believes X-Forwarded-For only from the proxy's fixed address, which nginx overwrites.
    proxy_ip = SERVICES["proxy"]["networks"]["backend"]["ipv4_address"]
    assert config["server"]["trusted_proxies"] == [f"{proxy_ip}/32"]
    subnet = COMPOSE["networks"]["backend"]["ipam"]["config"][0]["subnet"]
    assert proxy_ip.rsplit(".", 1)[0] == subnet.rsplit(".", 1)[0]
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in nginx


def test_compose_secrets_are_files_and_never_literals() -> None:
    for name, secret in COMPOSE["secrets"].items():
        assert set(secret) == {"file"}, f"secret {name}: from a file created by init.sh"
        assert secret["file"].startswith("./secrets/"), name
    ignore = (COMPOSE_DIR / "secrets" / ".gitignore").read_text(encoding="utf-8").split()
    assert "*" in ignore
    token_names = {Path(s["file"]).name for s in COMPOSE["secrets"].values() if s["file"].endswith(".token")}
    init = (COMPOSE_DIR / "init.sh").read_text(encoding="utf-8")
    for token_file in token_names:
        assert f"new_token {token_file.removesuffix('.token')}" in init, token_file
    config = tomllib.loads((COMPOSE_DIR / "config" / "ingest.toml").read_text(encoding="utf-8"))
    mounted = {f"/run/secrets/{s if isinstance(s, str) else s['source']}"
               for s in SERVICES["ingest-1"]["secrets"]}
    for dest in config["destinations"]:
        assert set(dest["token_files"]) <= mounted, dest["name"]
    suspicious = re.compile(r"(TOKEN|PASSWORD|LICENSE_KEY|SECRET)(?!_FILE)", re.IGNORECASE)
    for name, service in SERVICES.items():
        env = service.get("environment", {})
        items = env.items() if isinstance(env, dict) else (e.split("=", 1) for e in env)
        for key, _value in items:
            assert not suspicious.search(key), f"{name}: {key} looks like a secret in the environment"


def test_compose_falco_is_plugin_only_with_the_repository_rules() -> None:
    falco = SERVICES["falco"]
    command = falco["command"]
    assert command[command.index("--disable-source") + 1] == "syscall"
    targets = {c["target"]: COMPOSE["configs"][c["source"]]["file"] for c in falco["configs"]}
    rules = (COMPOSE_DIR / targets["/etc/falco/rules.d/gitlab.yaml"]).resolve()
    assert rules == ROOT / "rules" / "gitlab.yaml"
    config = yaml.safe_load((COMPOSE_DIR / targets["/etc/falco/falco.yaml"]).read_text(encoding="utf-8"))
    assert set(config["rules_files"]) <= set(targets), "every rules file Falco loads is mounted"
    assert plugin_brokers(config["plugins"][0]["init_config"]) == "kafka:9092"


def test_compose_environment_file_documents_every_variable() -> None:
    used = set(_INTERPOLATION.findall(COMPOSE_FILE.read_text(encoding="utf-8")))
    example: dict[str, str] = {}
    for line in (COMPOSE_DIR / ".env.example").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            example[key] = value
    for variable, default in used:
        assert variable in example, f".env.example lacks {variable}"
        if default:
            assert example[variable] == default, f"{variable}: {example[variable]!r} vs {default!r}"


def test_compose_enrich_geoip_defaults_to_off() -> None:
    enrich = SERVICES["enrich"]
    env = interpolate(enrich["environment"])
    assert env["FALCO_GITLAB_ENRICH_GEOIP__CITY_DB"] == "null"
    assert env["FALCO_GITLAB_ENRICH_GEOIP__ASN_DB"] == "null"
    from falco_gitlab.config import _env_value

    assert _env_value("null") is None, "the config loader must turn 'null' into an unset path"


# ---------------------------------------------------------------------------------------------------
# Dockerfiles
# ---------------------------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, f"{rel(path)} ends inside a continued line"
    return instructions


def resolve_args(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def dockerignore_allows(path: Path, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a directory pattern covers what is under it."""
    allowed = True
    text = str(path)
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.rstrip("/")
        if (fnmatch.fnmatch(text, body) or text.startswith(body + "/")
                or (body.startswith("**/") and fnmatch.fnmatch(Path(text).name, body[3:]))):
            allowed = negate
    return allowed


@pytest.mark.parametrize("path", DOCKERFILES, ids=rel)
def test_dockerfile_lint(path: Path) -> None:
    instructions = dockerfile_instructions(path)
    args: dict[str, str] = {}
    stages: list[str] = []
    final_user = None
    for keyword, rest in instructions:
        if keyword == "ARG" and "=" in rest and not stages:
            key, _, value = rest.partition("=")
            args[key] = value
        if keyword == "FROM":
            image = resolve_args(rest.split()[0], args)
            stages.append(image)
            final_user = None
            if not re.fullmatch(r"[a-z0-9]+", image):  # not a reference to an earlier stage
                name, _, tag = image.rpartition(":")
                assert name and tag and tag != "latest" and re.search(r"\d", tag), f"unpinned base {image}"
        if keyword == "USER":
            final_user = rest
    assert len(stages) >= 2, "multi-stage: build tools stay out of the runtime image"
    assert final_user is not None, "the runtime stage must set USER"
    assert final_user.split(":")[0] not in ("0", "root"), f"runs as {final_user}"
    keywords = [k for k, _ in instructions]
    last_from = len(keywords) - 1 - keywords[::-1].index("FROM")
    runtime = instructions[last_from:]
    assert any(k == "HEALTHCHECK" for k, _ in runtime), "HEALTHCHECK in the runtime stage"
    for keyword in ("ENTRYPOINT", "CMD"):
        values = [r for k, r in runtime if k == keyword]
        assert values and values[-1].startswith("["), f"{keyword} in exec form"
    # Every COPY from the build context exists and survives the Dockerfile's .dockerignore.
    ignore_file = path.with_name(path.name + ".dockerignore")
    patterns = [line.strip() for line in ignore_file.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")]
    for keyword, rest in instructions:
        if keyword != "COPY" or "--from=" in rest:
            continue
        sources = [part for part in rest.split() if not part.startswith("--")][:-1]
        for source in sources:
            matches = list(ROOT.glob(source)) if any(c in source for c in "*?[") else [ROOT / source]
            if "*" in source:
                continue  # optional files (README*)
            for match in matches:
                assert match.exists(), f"COPY {source}: missing in the repository"
                assert dockerignore_allows(match.relative_to(ROOT), patterns), f"{source} is dockerignored"


def test_falco_image_builds_the_plugin_on_the_runtime_python() -> None:
    path = DOCKER / "falco.Dockerfile"
    instructions = dockerfile_instructions(path)
    args = {k: v for kw, rest in instructions if kw == "ARG" and "=" in rest
            for k, _, v in [rest.partition("=")]}
    falco_image = args["FALCO_IMAGE"]
    name, _, tag = falco_image.partition(":")
    assert name == "falcosecurity/falco" and tag.endswith("-debian")
    major, minor = (int(x) for x in tag.split("-")[0].split(".")[:2])
    assert (major, minor) >= (0, 40), "plugin API 3.10 needs Falco >= 0.40"
    assert args["PYTHON_IMAGE"].startswith("python:3.11-")
    pipeline_args = {k: v for kw, rest in dockerfile_instructions(DOCKER / "pipeline.Dockerfile")
                     if kw == "ARG" and "=" in rest for k, _, v in [rest.partition("=")]}
    assert pipeline_args["PYTHON_IMAGE"] == args["PYTHON_IMAGE"]
    text = path.read_text(encoding="utf-8")
    assert "falco-gitlab plugin build" in text
    assert "--list=gitlab" in text and "-V /etc/falco/rules.d/gitlab.yaml" in text
    cmd = json.loads(next(r for k, r in reversed(instructions) if k == "CMD"))
    assert cmd[cmd.index("--disable-source") + 1] == "syscall"
    config = yaml.safe_load((DOCKER / "falco" / "falco.yaml").read_text(encoding="utf-8"))
    for target in config["rules_files"]:
        assert f" {target}" in text, f"the image must contain {target}"


# ---------------------------------------------------------------------------------------------------
# create-topics.sh, run against stub Kafka tools
# ---------------------------------------------------------------------------------------------------

STUB = r"""#!/usr/bin/env bash
printf '%s %s\n' "$(basename "$0")" "$*" >> "$STUB_LOG"
if [[ "$(basename "$0")" == kafka-topics.sh && " $* " == *" --describe "* ]]; then
    printf 'Topic: x\tTopicId: abc\tPartitionCount: %s\tReplicationFactor: 3\tConfigs: \n' "$STUB_PARTITIONS"
fi
exit 0
"""


def run_topics_script(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("kafka-topics.sh", "kafka-configs.sh"):
        (bin_dir / tool).write_text(STUB, encoding="utf-8")
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("", encoding="utf-8")
    environ = {"PATH": os.environ["PATH"], "KAFKA_BIN": str(bin_dir), "STUB_LOG": str(log),
               "STUB_PARTITIONS": "6", "BOOTSTRAP_SERVERS": "kafka:9092", **env}
    done = subprocess.run(["bash", str(TOPICS_SCRIPT)], env=environ, capture_output=True, text=True,
                          timeout=30, check=False)
    return done, log.read_text(encoding="utf-8").splitlines()


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_topics_script_creates_and_converges_the_three_topics(tmp_path: Path) -> None:
    done, calls = run_topics_script(tmp_path)
    assert done.returncode == 0, done.stderr
    creates = [c for c in calls if " --create " in f" {c} "]
    assert len(creates) == 3
    for topic, retention in zip(TOPICS, ("604800000", "2592000000", "2592000000"), strict=True):
        create = next(c for c in creates if f"--topic {topic} " in c)
        for flag in ("--if-not-exists", "--replication-factor 3", "--partitions 6"):
            assert flag in create
        assert f"retention.ms={retention}" in create and "min.insync.replicas=2" in create
        assert any(c.startswith("kafka-configs.sh") and f"--entity-name {topic} " in c
                   and f"retention.ms={retention}" in c for c in calls)
    assert not any(" --alter " in c and "--partitions" in c for c in calls)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_topics_script_grows_partitions_only_when_allowed(tmp_path: Path) -> None:
    done, calls = run_topics_script(tmp_path, STUB_PARTITIONS="3", PARTITIONS="6")
    assert done.returncode == 0 and "left as is" in done.stderr
    assert not any("--alter" in c and "--partitions" in c for c in calls if c.startswith("kafka-topics.sh"))
    done, calls = run_topics_script(tmp_path, STUB_PARTITIONS="3", PARTITIONS="6",
                                    ALLOW_PARTITION_INCREASE="true")
    assert done.returncode == 0
    assert sum("--alter" in c and "--partitions 6" in c for c in calls) == 3


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_topics_script_refuses_impossible_settings(tmp_path: Path) -> None:
    done, calls = run_topics_script(tmp_path, REPLICATION_FACTOR="1", MIN_INSYNC_REPLICAS="2")
    assert done.returncode == 2 and not calls
    done, calls = run_topics_script(tmp_path, PARTITIONS="six")
    assert done.returncode == 2 and not calls


def test_topics_script_names_the_contract_topics() -> None:
    text = TOPICS_SCRIPT.read_text(encoding="utf-8")
    assert re.findall(r"^ensure_topic (\S+)", text, re.MULTILINE) == list(TOPICS)


# ---------------------------------------------------------------------------------------------------
# The container health check
# ---------------------------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def local_http() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_healthcheck_script(local_http: int) -> None:
    script = DOCKER / "healthcheck.py"

    def run(url: str) -> int:
        env = {"PATH": os.environ["PATH"], "HEALTHCHECK_TIMEOUT": "2"}
        return subprocess.run([sys.executable, str(script), url], env=env, capture_output=True,
                              timeout=10, check=False).returncode

    assert run(f"http://127.0.0.1:{local_http}/healthz") == 0
    assert run(f"http://127.0.0.1:{local_http}/readyz") == 1
    assert run(f"http://127.0.0.1:{_free_port()}/healthz") == 1
    assert run("ftp://127.0.0.1/") == 1


# ---------------------------------------------------------------------------------------------------
# Small things that break deployments
# ---------------------------------------------------------------------------------------------------


def test_shell_scripts_parse() -> None:
    for script in (TOPICS_SCRIPT, COMPOSE_DIR / "init.sh"):
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"{rel(script)}: {done.stderr}"
        assert os.access(script, os.X_OK), f"{rel(script)} must be executable"


def test_kafka_cluster_id_is_a_base64_uuid() -> None:
    cluster_id = interpolate(SERVICES["kafka"]["environment"]["CLUSTER_ID"])
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16
