"""The Kubernetes manifests (deploy/k8s) agree with the code and with Kubernetes' schemas, without a cluster.

Every overlay is rendered as kustomize renders it, by a small renderer for the features the manifests use
(resources, strategic-merge patches, images; anything else is refused), which is compared with
``kubectl kustomize`` where kubectl is installed. Every rendered object is validated offline against
Kubernetes' OpenAPI schemas in their strict form (an unknown field is an error) with kubernetes-validate
(the test extra), for the oldest Kubernetes the manifests support (1.30: native gRPC probes, the preStop
sleep action) and the newest the package ships; broken objects are shown to fail. Then what a schema
cannot know: images are the Dockerfile's variants, commands are console scripts, every variable is one
the service reads (its flags, parsed here with those very values), ports and gRPC health probes match the
code and compose.yaml, the workers' Services are headless and the gateway's dns:/// targets name them,
PodDisruptionBudgets select pods that exist, grace periods outlast the drain, pods run as the image's
user without privileges, and each overlay asks for the accelerators it is named after.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_compose import (
    PYPROJECT,
    ROOT,
    SCRIPTS,
    SERVICES,
    RecordingEnviron,
    demo_model_destination,
    dockerfile_env,
    dockerfile_instructions,
    string_literals,
)

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
RENDERINGS = ["base", *OVERLAYS]
# overlay -> the image tag, which is the Dockerfile's VARIANT build argument (the base is the CPU image)
VARIANT = {"base": "cpu", "cpu": "cpu", "gpu": "cuda", "multihost": "cuda", "tpu": "tpu"}
# The one object an overlay may add: the multi-host LM worker group's own headless Service.
GROUP_SERVICE = "lm-worker-group"
POD_NAME = "statefulset.kubernetes.io/pod-name"  # a label the StatefulSet controller gives each of its pods
IMAGE = "gemma3-serve"
APPS = ("vision-worker", "lm-worker", "gateway")  # workload, Service and compose service share the name
PORTS = {"gateway": 50051, "lm-worker": 50052, "vision-worker": 50053}
OLDEST = "1.30.0"  # native gRPC probes (GA 1.27) and the preStop sleep action (on by default from 1.30)


def kustomization_dir(name: str) -> Path:
    return K8S / "base" if name == "base" else K8S / "overlays" / name


# --- a minimal kustomize ------------------------------------------------------------------------------------

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}
# Lists that a strategic-merge patch merges item by item (by this key); every other list is replaced.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath"}
# Lists Kubernetes merges by a key this renderer does not implement: a patch touching them is refused.
UNSUPPORTED_LISTS = {"ports", "imagePullSecrets", "hostAliases", "topologySpreadConstraints", "volumeDevices",
                     "ephemeralContainers", "resourceClaims", "envFrom"}


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def strategic_merge(target, patch, field: str = ""):
    """Kubernetes' strategic merge for what the overlays use: maps merge, null deletes a key, lists in
    MERGE_KEYS merge by their key (new items appended), other lists are replaced."""
    if isinstance(patch, dict):
        assert not any(k.startswith("$") for k in patch), f"{field}: patch directives are not supported"
        out = dict(target) if isinstance(target, dict) else {}
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = strategic_merge(out.get(key), value, key)
        return out
    if isinstance(patch, list):
        assert field not in UNSUPPORTED_LISTS, f"patching {field!r} is not supported by this renderer"
        key = MERGE_KEYS.get(field)
        if key is None or not isinstance(target, list):
            return copy.deepcopy(patch)
        out = [copy.deepcopy(item) for item in target]
        for item in patch:
            index = next((i for i, old in enumerate(out) if old[key] == item[key]), None)
            if index is None:
                out.append(copy.deepcopy(item))
            else:
                out[index] = strategic_merge(out[index], item, field)
        return out
    return patch


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference; a registry's :port is part of the name."""
    image, _, digest = image.partition("@")
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon + 1:], digest or None
    return image, None, digest or None


def pod_specs(obj: dict) -> list[dict]:
    if obj["kind"] == "Pod":
        return [obj["spec"]]
    template = obj.get("spec", {}).get("template")
    return [template["spec"]] if template else []


def set_images(objects: list[dict], images: list[dict]) -> None:
    """kustomize's ``images``: newName, newTag and digest for every container whose image has that name."""
    for entry in images:
        assert set(entry) <= {"name", "newName", "newTag", "digest"}, entry
        for obj in objects:
            for spec in pod_specs(obj):
                for container in spec.get("initContainers", []) + spec.get("containers", []):
                    name, tag, digest = split_image(container["image"])
                    if name != entry["name"]:
                        continue
                    name = entry.get("newName", name)
                    tag = entry.get("newTag", tag)
                    digest = entry.get("digest", digest)
                    container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def render_directory(directory: Path) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{directory}: kustomization fields this renderer does not implement: {sorted(unknown)}"
    assert kustomization["kind"] == "Kustomization"
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        objects += render_directory(path) if path.is_dir() else load_documents(path)
    ids = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(ids) == len(set(ids)), f"{directory}: objects defined twice: {ids}"
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"path"}, f"{directory}: only strategic-merge patches from files: {patch}"
        for doc in load_documents(directory / patch["path"]):
            matches = [i for i, o in enumerate(objects) if (o["apiVersion"], o["kind"], o["metadata"]["name"])
                       == (doc["apiVersion"], doc["kind"], doc["metadata"]["name"])]
            assert len(matches) == 1, f"{directory}/{patch['path']}: no {doc['kind']}/{doc['metadata']['name']}"
            objects[matches[0]] = strategic_merge(objects[matches[0]], doc)
    set_images(objects, kustomization.get("images", []))
    return objects


@functools.cache
def _rendered(name: str) -> str:
    return json.dumps(render_directory(kustomization_dir(name)))


def rendered(name: str) -> list[dict]:
    """The objects of the base or an overlay (a fresh copy: tests may change it)."""
    return json.loads(_rendered(name))


def find(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def workload(objects: list[dict], name: str) -> dict:
    found = [o for o in workloads(objects) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one workload named {name}"
    return found[0]


def container(objects: list[dict], name: str) -> dict:
    (spec,) = pod_specs(workload(objects, name))
    (only,) = spec["containers"]
    return only


def selects(selector: dict, labels: dict) -> bool:
    """A Service's selector (a plain map) or a label selector (matchLabels) against a pod's labels."""
    if "matchLabels" in selector or "matchExpressions" in selector:
        assert set(selector) == {"matchLabels"}, "only matchLabels selectors are checked here"
        selector = selector["matchLabels"]
    assert selector, "an empty selector selects every pod"
    return all(labels.get(k) == v for k, v in selector.items())


def selected_workloads(objects: list[dict], selector: dict) -> list[str]:
    """Workloads with a pod the selector selects (a pod-name label: one of a StatefulSet's ordinals)."""
    out = []
    for w in workloads(objects):
        labels = dict(w["spec"]["template"]["metadata"]["labels"])
        pod = (selector.get("matchLabels") or selector).get(POD_NAME)
        if pod is not None and w["kind"] == "StatefulSet":
            name, _, ordinal = pod.rpartition("-")
            if name == w["metadata"]["name"] and ordinal.isdigit() and int(ordinal) < w["spec"]["replicas"]:
                labels[POD_NAME] = pod
        if selects(selector, labels):
            out.append(w["metadata"]["name"])
    return out


# --- quantities ------------------------------------------------------------------------------------------

SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9,
            "T": 10**12, "m": 1e-3, "": 1}


def quantity(value) -> float:
    """A Kubernetes resource quantity (250m, 2Gi, 4) as a number."""
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert m and m.group(2) in SUFFIXES, f"not a quantity: {value!r}"
    return float(m.group(1)) * SUFFIXES[m.group(2)]


def redis_bytes(value: str) -> int:
    """Redis's memory units: 1k = 1000, 1kb = 1024, likewise m/mb and g/gb."""
    m = re.fullmatch(r"(\d+)(k|kb|m|mb|g|gb)?", value.lower())
    assert m, f"not a Redis memory size: {value!r}"
    unit = {None: 1, "k": 10**3, "kb": 2**10, "m": 10**6, "mb": 2**20, "g": 10**9, "gb": 2**30}[m.group(2)]
    return int(m.group(1)) * unit


# --- the service behind a container ----------------------------------------------------------------------

def entry_module(c: dict):
    script = c["command"][0]
    assert script in SCRIPTS, f"{c['name']}: command {script!r} is not a console script of pyproject.toml"
    return importlib.import_module(SCRIPTS[script].split(":")[0])


def container_env(objects: list[dict], c: dict) -> dict[str, str]:
    """The container's variables with ConfigMap references resolved (a missing key fails, as the kubelet
    would refuse to start the container)."""
    out = {}
    for var in c.get("env", []):
        assert set(var) in ({"name", "value"}, {"name", "valueFrom"}), var
        if "value" in var:
            out[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"]
        assert set(ref) == {"configMapKeyRef"}, f"{var['name']}: only ConfigMap references are resolved here"
        data = find(objects, "ConfigMap", ref["configMapKeyRef"]["name"]).get("data", {})
        assert ref["configMapKeyRef"]["key"] in data, f"{var['name']}: no key {ref['configMapKeyRef']['key']!r}"
        out[var["name"]] = data[ref["configMapKeyRef"]["key"]]
    assert len(out) == len(c.get("env", [])), f"{c['name']}: a variable is set twice"
    return out


def parsed_flags(objects: list[dict], name: str, monkeypatch):
    """(args, variables looked up): the service's own flag parser run on the container's environment."""
    c = container(objects, name)
    module = entry_module(c)
    env = RecordingEnviron(container_env(objects, c))
    with monkeypatch.context() as m:
        m.setattr(os, "environ", env)
        args = module.parse_args([])
    return args, env.read


# --- the real validator ----------------------------------------------------------------------------------

def validator():
    try:
        import kubernetes_validate
    except ModuleNotFoundError:
        pytest.fail("kubernetes-validate is missing: install the test extra (pip install -e '.[test]')")
    return kubernetes_validate


def k8s_versions() -> list[str]:
    try:
        import kubernetes_validate
    except ModuleNotFoundError:
        return [OLDEST]  # validator() fails the test with the reason
    return sorted({OLDEST, kubernetes_validate.latest_version()})


def validate(obj: dict, version: str) -> None:
    """kubernetes-validate with the strict schemas: unknown fields are errors, as ``kubectl --validate``."""
    validator().validate(obj, version, strict=True)


@pytest.mark.parametrize("version", k8s_versions())
@pytest.mark.parametrize("name", RENDERINGS)
def test_every_object_is_valid_against_the_kubernetes_schemas(name, version):
    for obj in rendered(name):
        try:
            validate(obj, version)
        except validator().ValidationError as e:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} at {'.'.join(map(str, e.path))}: "
                        f"{e.message}")


def _grpc_probe_port_by_name(objects):
    container(objects, "lm-worker")["readinessProbe"]["grpc"]["port"] = "grpc"  # gRPC probes take numbers


def _misspelled_field(objects):
    c = container(objects, "gateway")
    c["readinesProbe"] = c.pop("readinessProbe")


def _env_value_not_a_string(objects):
    next(v for v in container(objects, "lm-worker")["env"] if v["name"] == "GEMMA3_LM_NUM_SLOTS")["value"] = 8


def _replicas_as_a_string(objects):
    workload(objects, "vision-worker")["spec"]["replicas"] = "2"


def _sleep_without_seconds(objects):
    container(objects, "gateway")["lifecycle"]["preStop"]["sleep"] = {"second": 5}


@pytest.mark.parametrize("breakage", [_grpc_probe_port_by_name, _misspelled_field, _env_value_not_a_string,
                                      _replicas_as_a_string, _sleep_without_seconds])
def test_the_validator_rejects_a_broken_object(breakage):
    objects = rendered("cpu")
    before = {id(o): json.dumps(o, sort_keys=True) for o in objects}
    breakage(objects)
    (broken,) = [o for o in objects if json.dumps(o, sort_keys=True) != before[id(o)]]
    with pytest.raises(validator().ValidationError):
        validate(broken, OLDEST)


def test_the_validator_rejects_an_unknown_kind():
    obj = copy.deepcopy(find(rendered("cpu"), "Deployment", "gateway"))
    obj["kind"] = "Deploymnet"
    with pytest.raises(validator().SchemaNotFoundError):
        validate(obj, OLDEST)


# --- the renderer ----------------------------------------------------------------------------------------

def test_every_overlay_renders_the_whole_stack():
    assert OVERLAYS == ["cpu", "gpu", "multihost", "tpu"]
    ids = {name: sorted((o["kind"], o["metadata"]["name"]) for o in rendered(name)) for name in RENDERINGS}
    for name in OVERLAYS:
        extra = [("Service", GROUP_SERVICE)] if name == "multihost" else []
        assert ids[name] == sorted(ids["base"] + extra), f"{name} adds or drops objects"
    assert {"ConfigMap", "Deployment", "StatefulSet", "Service", "PodDisruptionBudget"} == {k for k, _ in ids["base"]}


def normalized(objects: list[dict]) -> dict:
    """Objects by (kind, name), with merged lists in a fixed order (kustomize puts patched items first)."""
    def norm(value, field=""):
        if isinstance(value, dict):
            return {k: norm(v, k) for k, v in value.items()}
        if isinstance(value, list):
            items = [norm(v, field) for v in value]
            key = MERGE_KEYS.get(field)
            return sorted(items, key=lambda item: str(item[key])) if key else items
        return value
    return {(o["kind"], o["metadata"]["name"]): norm(o) for o in objects}


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.skipif(kustomize_command() is None, reason="neither kustomize nor kubectl is installed")
@pytest.mark.parametrize("name", RENDERINGS)
def test_the_renderer_agrees_with_kustomize(name):
    result = subprocess.run([*kustomize_command(), str(kustomization_dir(name))], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert normalized(rendered(name)) == normalized(list(yaml.safe_load_all(result.stdout)))


@pytest.mark.parametrize("kustomization, error", [
    ({"resources": ["cm.yaml"], "commonLabels": {"a": "b"}}, "commonLabels"),
    ({"resources": ["cm.yaml"], "patches": [{"path": "patch.yaml", "target": {"kind": "ConfigMap"}}]},
     "only strategic-merge patches"),
    ({"resources": ["cm.yaml"], "patches": [{"path": "other.yaml"}]}, "no ConfigMap/other"),
])
def test_the_renderer_refuses_what_it_does_not_implement(tmp_path, kustomization, error):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\ndata: {a: b}\n")
    (tmp_path / "patch.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\ndata: {a: c}\n")
    (tmp_path / "other.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: other}\n")
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", **kustomization}))
    with pytest.raises(AssertionError, match=error):
        render_directory(tmp_path)


def test_strategic_merge_merges_by_key_and_replaces_other_lists():
    base = {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}],
                            "args": ["--old"], "resources": {"requests": {"cpu": "1"}}}]}
    patch = {"containers": [{"name": "a", "env": [{"name": "Y", "value": "3"}, {"name": "Z", "value": "4"}],
                             "args": ["--new"], "resources": {"limits": {"memory": "1Gi"}}}]}
    (merged,) = strategic_merge(base, patch)["containers"]
    assert merged["env"] == [{"name": "X", "value": "1"}, {"name": "Y", "value": "3"}, {"name": "Z", "value": "4"}]
    assert merged["args"] == ["--new"]
    assert merged["resources"] == {"requests": {"cpu": "1"}, "limits": {"memory": "1Gi"}}


# --- images and commands ---------------------------------------------------------------------------------

def dockerfile_uid() -> int:
    (uid,) = [int(m) for _, word, rest in dockerfile_instructions() if word == "RUN"
              for m in re.findall(r"useradd\b.*--uid (\d+)", rest)]
    return uid


@pytest.mark.parametrize("name", RENDERINGS)
def test_images_are_the_dockerfiles_variant_or_the_pinned_redis(name):
    variants = {"cpu"} | {extra for extra in PYPROJECT["project"]["optional-dependencies"]
                          if any(d.startswith("jax[") for d in PYPROJECT["project"]["optional-dependencies"][extra])}
    assert VARIANT[name] in variants, f"{VARIANT[name]} is not a VARIANT the Dockerfile builds"
    compose_images = {split_image(s["image"])[0] for s in SERVICES.values() if "build" in s}
    assert compose_images == {IMAGE}
    for obj in workloads(rendered(name)):
        for c in pod_specs(obj)[0]["containers"]:
            image, tag, _ = split_image(c["image"])
            if c["name"] == "redis":
                assert c["image"] == SERVICES["redis"]["image"], "the Redis compose.yaml runs"
                assert tag and tag != "latest" and re.match(r"\d", tag), "a pinned Redis version"
            else:
                assert (image, tag) == (IMAGE, VARIANT[name]), f"{name}: {c['name']} runs {c['image']}"
                assert c.get("imagePullPolicy") == "IfNotPresent", "a locally built or loaded image is used as is"


@pytest.mark.parametrize("name", RENDERINGS)
def test_commands_are_console_scripts(name):
    for app in APPS:
        c = container(rendered(name), app)
        module = entry_module(c)
        assert c["command"] == [next(s for s in SCRIPTS if SCRIPTS[s].startswith(module.__name__ + ":"))]
        assert "args" not in c, "every setting goes through the environment"
        assert c["name"] == app
        compose = SERVICES[app]["command"]
        assert c["command"] == compose, f"{app}: compose.yaml runs {compose}"


# --- environment -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("app", APPS)
@pytest.mark.parametrize("name", RENDERINGS)
def test_every_variable_a_container_sets_is_read_by_its_service(name, app, monkeypatch):
    objects = rendered(name)
    args, read = parsed_flags(objects, app, monkeypatch)  # also: every value parses (types, choices)
    package = SCRIPTS[container(objects, app)["command"][0]].split(".")[0]
    unread = set(container_env(objects, container(objects, app))) - (read | string_literals(package, "serving"))
    assert not unread, f"{name}: {app} sets variables its code never reads: {sorted(unread)}"
    assert args.host == "0.0.0.0", f"{app} must listen on every interface of its pod"


@pytest.mark.parametrize("name", RENDERINGS)
def test_configmap_keys_are_all_used(name):
    objects = rendered(name)
    used = {v["valueFrom"]["configMapKeyRef"]["key"] for w in workloads(objects)
            for c in pod_specs(w)[0]["containers"] for v in c.get("env", []) if "valueFrom" in v}
    (config,) = [o for o in objects if o["kind"] == "ConfigMap"]
    assert set(config["data"]) == used
    assert all(isinstance(v, str) for v in config["data"].values())


@pytest.mark.parametrize("name", RENDERINGS)
def test_workers_load_the_demo_model_from_the_image_and_share_redis(name, monkeypatch):
    objects = rendered(name)
    redis = find(objects, "Service", "redis")
    for worker in ("vision-worker", "lm-worker"):
        args, _ = parsed_flags(objects, worker, monkeypatch)
        assert args.model == dockerfile_env()["GEMMA3_MODEL"] == demo_model_destination()
        assert args.redis_url == f"redis://redis:{redis['spec']['ports'][0]['port']}/0"


def test_redis_is_a_bounded_lru_cache_as_in_compose():
    c = container(rendered("cpu"), "redis")
    cmd = c["command"] + c.get("args", [])
    assert cmd[0] == "redis-server"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "allkeys-lru"
    maxmemory = redis_bytes(cmd[cmd.index("--maxmemory") + 1])
    assert maxmemory < quantity(c["resources"]["limits"]["memory"]), "--maxmemory must stay below the limit"
    assert maxmemory <= quantity(c["resources"]["requests"]["memory"]), "request what it will hold"
    compose = SERVICES["redis"]["command"]
    for flag in ("--maxmemory-policy", "--save", "--appendonly", "--protected-mode"):
        assert cmd[cmd.index(flag) + 1] == compose[compose.index(flag) + 1], flag
    assert c["ports"][0]["containerPort"] == 6379
    assert c["readinessProbe"]["exec"]["command"] == SERVICES["redis"]["healthcheck"]["test"][1:]


# --- ports, probes, Services -------------------------------------------------------------------------------

def test_the_documented_ports():
    objects = rendered("base")
    for app, port in PORTS.items():
        assert container(objects, app)["ports"][0]["containerPort"] == port
        assert find(objects, "Service", app)["spec"]["ports"][0]["port"] == port


@pytest.mark.parametrize("app", APPS)
@pytest.mark.parametrize("name", RENDERINGS)
def test_ports_and_grpc_health_probes_match_the_code(name, app, monkeypatch):
    objects = rendered(name)
    args, _ = parsed_flags(objects, app, monkeypatch)
    c = container(objects, app)
    module = entry_module(c)
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [("grpc", args.port)]
    compose_service = SERVICES[app]["healthcheck"]["test"][5]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(c[probe]) & {"grpc", "exec", "httpGet", "tcpSocket"} == {"grpc"}, f"{app}: native gRPC {probe}"
        assert c[probe]["grpc"] == {"port": args.port, "service": module.SERVICE}, f"{app}: {probe}"
        assert module.SERVICE == compose_service
    service = find(objects, "Service", app)
    (port,) = service["spec"]["ports"]
    assert port["port"] == args.port and port["targetPort"] in ("grpc", args.port)
    assert port["appProtocol"] == "kubernetes.io/h2c"
    assert selected_workloads(objects, service["spec"]["selector"]) == [app]


def start_period(service: str) -> int:
    value = SERVICES[service]["healthcheck"]["start_period"]
    m = re.fullmatch(r"(\d+)([smh])", value)
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]


@pytest.mark.parametrize("app", APPS)
def test_startup_probes_wait_as_long_as_compose_does(app):
    probe = container(rendered("base"), app)["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= start_period(app)


@pytest.mark.parametrize("name", RENDERINGS)
def test_worker_services_are_headless_and_the_gateway_targets_them(name, monkeypatch):
    objects = rendered(name)
    args, _ = parsed_flags(objects, "gateway", monkeypatch)
    for target, worker in [(args.vision_target, "vision-worker"), (args.lm_target, "lm-worker")]:
        assert target.startswith("dns:///"), "dns:/// lets the gateway balance over every worker pod"
        host, port = target[len("dns:///"):].rsplit(":", 1)
        service = find(objects, "Service", host)
        assert host == worker and service["spec"]["clusterIP"] == "None", f"{host}: a headless Service"
        assert not service["spec"].get("publishNotReadyAddresses"), "only ready (warm) workers in DNS"
        assert int(port) == service["spec"]["ports"][0]["port"] == parsed_flags(objects, worker, monkeypatch)[0].port
    lm = workload(objects, "lm-worker")
    assert lm["kind"] == "StatefulSet"
    lm_args = parsed_flags(objects, "lm-worker", monkeypatch)[0]
    if lm_args.num_processes == 1:
        assert lm["spec"]["serviceName"] == "lm-worker"
    else:  # a multi-host group: the gateway reaches process 0 only; the group finds itself before readiness
        assert find(objects, "Service", "lm-worker")["spec"]["selector"][POD_NAME] == "lm-worker-0"
        group = find(objects, "Service", lm["spec"]["serviceName"])
        assert group["metadata"]["name"] == GROUP_SERVICE and group["spec"]["clusterIP"] == "None"
        assert group["spec"]["publishNotReadyAddresses"] is True
        assert lm["spec"]["replicas"] == lm_args.num_processes and lm["spec"]["podManagementPolicy"] == "Parallel"
        host, port = lm_args.coordinator_address.rsplit(":", 1)
        assert host == f"lm-worker-0.{GROUP_SERVICE}"
        assert {int(port), int(port) + 1} == {p["port"] for p in group["spec"]["ports"]}  # coordinator, group
        assert lm_args.process_id == -1, "each pod's process id is its ordinal"
    assert workload(objects, "vision-worker")["kind"] == workload(objects, "gateway")["kind"] == "Deployment"
    gateway = find(objects, "Service", "gateway")
    assert gateway["spec"].get("clusterIP") != "None" and gateway["spec"].get("type", "ClusterIP") == "ClusterIP"


@pytest.mark.parametrize("name", RENDERINGS)
def test_selectors_pick_their_own_pods(name):
    objects = rendered(name)
    for w in workloads(objects):
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert selects(w["spec"]["selector"], labels)
        assert selected_workloads(objects, w["spec"]["selector"]) == [w["metadata"]["name"]]
    for service in (o for o in objects if o["kind"] == "Service"):
        name = service["metadata"]["name"]
        assert selected_workloads(objects, service["spec"]["selector"]) == [
            "lm-worker" if name == GROUP_SERVICE else name]


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_workload_has_a_disruption_budget_that_lets_nodes_drain(name):
    objects = rendered(name)
    covered = []
    for pdb in (o for o in objects if o["kind"] == "PodDisruptionBudget"):
        selected = selected_workloads(objects, pdb["spec"]["selector"])
        assert len(selected) == 1, f"PDB {pdb['metadata']['name']} selects {selected}"
        covered += selected
        replicas = workload(objects, selected[0])["spec"]["replicas"]
        budget = pdb["spec"]
        assert len({"minAvailable", "maxUnavailable"} & set(budget)) == 1
        allowed = budget["maxUnavailable"] if "maxUnavailable" in budget else replicas - budget["minAvailable"]
        assert allowed >= 1, f"{selected[0]}: a budget that never allows an eviction blocks node drains"
    assert sorted(covered) == sorted(w["metadata"]["name"] for w in workloads(objects))


@pytest.mark.parametrize("app", APPS)
@pytest.mark.parametrize("name", RENDERINGS)
def test_the_grace_period_outlasts_the_drain(name, app, monkeypatch):
    objects = rendered(name)
    args, _ = parsed_flags(objects, app, monkeypatch)
    spec = pod_specs(workload(objects, app))[0]
    c = container(objects, app)
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert args.drain_seconds > 0
    # preStop, then SIGTERM: the drain, then closing channels and caches (a few seconds at most)
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + args.drain_seconds + 5, app
    liveness = c["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > pre_stop + args.drain_seconds, \
        f"{app}: a draining pod (NOT_SERVING) must not be killed by its liveness probe"


# --- security --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", RENDERINGS)
def test_pods_run_unprivileged_with_a_read_only_root(name):
    """Pod Security Standards' restricted profile, and the image's own user for this project's pods."""
    objects = rendered(name)
    for w in workloads(objects):
        spec = pod_specs(w)[0]
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False, "no pod here talks to the API server"
        assert spec["enableServiceLinks"] is False, "no *_SERVICE_HOST/*_PORT variables beside the real ones"
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["readOnlyRootFilesystem"] is True
            for mount in c.get("volumeMounts", []):
                assert "emptyDir" in volumes[mount["name"]], f"{c['name']}: {mount['mountPath']}"
            if split_image(c["image"])[0] == IMAGE:
                assert pod["runAsUser"] == pod["runAsGroup"] == dockerfile_uid()
                assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, "JAX and XLA write to /tmp"


# --- resources and accelerators --------------------------------------------------------------------------

ACCELERATORS = {"nvidia.com/gpu", "google.com/tpu"}


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_container_requests_cpu_and_memory(name):
    for w in workloads(rendered(name)):
        for c in pod_specs(w)[0]["containers"]:
            requests, limits = c["resources"].get("requests", {}), c["resources"].get("limits", {})
            assert {"cpu", "memory"} <= set(requests), f"{name}: {c['name']}"
            assert quantity(limits["memory"]) >= quantity(requests["memory"]), f"{name}: {c['name']}"
            for resource in ACCELERATORS & set(requests):
                assert requests[resource] == limits.get(resource), "accelerators: requests equal limits"


def accelerators(objects: list[dict], app: str) -> dict:
    limits = container(objects, app).get("resources", {}).get("limits", {})
    return {k: v for k, v in limits.items() if k in ACCELERATORS}


@pytest.mark.parametrize("name", RENDERINGS)
def test_each_overlay_asks_for_its_accelerators(name, monkeypatch):
    objects = rendered(name)
    expected = {"base": None, "cpu": None, "gpu": "nvidia.com/gpu", "multihost": "nvidia.com/gpu",
                "tpu": "google.com/tpu"}[name]
    assert accelerators(objects, "gateway") == {} and accelerators(objects, "redis") == {}
    for worker in ("vision-worker", "lm-worker"):
        args, _ = parsed_flags(objects, worker, monkeypatch)
        spec = pod_specs(workload(objects, worker))[0]
        if expected is None:
            assert accelerators(objects, worker) == {}
            assert args.dtype == "float32", "float32 on CPU, as compose runs the demo model"
            assert "nodeSelector" not in spec and "tolerations" not in spec
            continue
        count = accelerators(objects, worker)[expected]
        assert set(accelerators(objects, worker)) == {expected} and count >= 1
        assert args.dtype == "bfloat16"
        assert {"key": expected, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        if worker == "lm-worker":
            assert args.tensor_parallel == count, "the mesh's tensor axis spans the pod's accelerators"
        if expected == "google.com/tpu":
            selector = spec["nodeSelector"]
            assert selector["cloud.google.com/gke-tpu-accelerator"].startswith("tpu-")
            topology = [int(n) for n in selector["cloud.google.com/gke-tpu-topology"].split("x")]
            assert math.prod(topology) == count, "a single-host slice: every chip of the topology"


def test_the_cpu_overlay_is_small():
    objects = rendered("cpu")
    for w in workloads(objects):
        for c in pod_specs(w)[0]["containers"]:
            assert quantity(c["resources"]["requests"]["cpu"]) <= 1, c["name"]
            assert quantity(c["resources"]["limits"]["memory"]) <= 4 * 2**30, c["name"]


# --- documentation ---------------------------------------------------------------------------------------

def test_the_readme_says_how_to_apply_scale_and_what_each_overlay_changes():
    text = (K8S / "README.md").read_text()
    for name in OVERLAYS:
        assert f"kubectl apply -k deploy/k8s/overlays/{name}" in text
        assert f"overlays/{name}" in text
    for kind, app in [("deployment", "gateway"), ("deployment", "vision-worker"), ("statefulset", "lm-worker")]:
        assert f"kubectl scale {kind}/{app}" in text
