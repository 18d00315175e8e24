"""compose.yaml, the Dockerfile and .dockerignore agree with the code, without Docker.

The compose file is validated against the Compose Specification's JSON schema (the copy that
check-jsonschema ships, ``--builtin-schema vendor.compose-spec``), and a broken file is shown to fail
it. Then what a schema cannot know: each service's command is a console script of this project, each
environment variable it sets is one the service reads (its flags, parsed here with those very values),
ports, gRPC health checks, ``depends_on``, Redis as a bounded LRU cache, the gpu and tracing profiles;
and the Dockerfile's stages, COPY sources and commands.
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from tests import services as running_services

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
CORE = ("redis", "vision-worker", "lm-worker", "gateway")


def load_compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


SPEC = load_compose()
SERVICES = SPEC["services"]


def interpolate(value, given: dict | None = None) -> str:
    """Compose's variable substitution with the variables ``given`` (others unset): ``${X:-d}`` and
    ``${X-d}`` give d, ``${X}`` gives "", ``$$`` is a literal $."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        if given and m.group(1) in given:
            return given[m.group(1)]
        return m.group(3) or ""

    return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(:?-([^}]*))?\}", sub, str(value))


def environment(service: dict, given: dict | None = None) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: interpolate("" if v is None else v, given) for k, v in env.items()}


def command(service: dict) -> list[str]:
    cmd = service.get("command")
    return shlex.split(cmd) if isinstance(cmd, str) else [interpolate(c) for c in cmd]


def app_services() -> dict[str, dict]:
    """The services that run this project's image (they have a build section)."""
    return {name: s for name, s in SERVICES.items() if "build" in s}


def entry_module(name: str):
    """The module whose ``main`` is the service's console script."""
    script = command(SERVICES[name])[0]
    assert script in SCRIPTS, f"{name}: command {script!r} is not a console script of pyproject.toml"
    return importlib.import_module(SCRIPTS[script].split(":")[0])


def port_of(target: str) -> int:
    return int(target.rsplit(":", 1)[1])


class RecordingEnviron(dict):
    """os.environ stand-in that remembers which variables were looked up."""

    def __init__(self, values):
        super().__init__(values)
        self.read = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def parsed_flags(name: str, monkeypatch, given: dict | None = None):
    """(args, variables looked up): the service's own flag parser run on the compose environment, with the
    shell variables ``given`` to compose."""
    module = entry_module(name)
    env = RecordingEnviron(environment(SERVICES[name], given))
    with monkeypatch.context() as m:
        m.setattr(os, "environ", env)
        args = module.parse_args([])
    return args, env.read


def string_literals(*packages: str) -> set[str]:
    """Every string constant in the Python files of these packages (variables the code reads by name)."""
    out = set()
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    out.add(node.value)
    return out


# --- the real validator ---------------------------------------------------------------------------------

def validate(path: Path) -> subprocess.CompletedProcess:
    """check-jsonschema (the test extra) with its vendored Compose Specification schema."""
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True)


def test_compose_file_is_valid_against_the_compose_spec_schema():
    result = validate(COMPOSE)
    assert "No module named check_jsonschema" not in result.stderr, \
        "check-jsonschema is missing: install the test extra (pip install -e '.[test]')"
    assert result.returncode == 0, result.stdout + result.stderr


def _misspelled_key(spec):
    spec["services"]["gateway"]["enviroment"] = spec["services"]["gateway"].pop("environment")


def _unknown_condition(spec):
    spec["services"]["gateway"]["depends_on"]["lm-worker"]["condition"] = "service_ready"


def _devices_not_a_list(spec):
    spec["services"]["lm-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"] = "nvidia"


def _ports_not_a_list(spec):
    spec["services"]["gateway"]["ports"] = {"50051": 50051}


def test_the_validator_accepts_the_file_as_the_breakages_below_rewrite_it(tmp_path):
    rewritten = tmp_path / "compose.yaml"
    rewritten.write_text(yaml.safe_dump(SPEC, sort_keys=False))  # anchors and merge keys resolved
    result = validate(rewritten)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("breakage", [_misspelled_key, _unknown_condition, _devices_not_a_list, _ports_not_a_list])
def test_the_validator_rejects_a_broken_compose_file(tmp_path, breakage):
    spec = copy.deepcopy(SPEC)
    breakage(spec)
    broken = tmp_path / "compose.yaml"
    broken.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = validate(broken)
    assert result.returncode != 0, f"{breakage.__name__} passed validation:\n{result.stdout}"
    assert "Schema validation errors" in result.stdout + result.stderr, result.stdout + result.stderr


def test_the_validator_rejects_yaml_that_does_not_parse(tmp_path):
    broken = tmp_path / "compose.yaml"
    broken.write_text("services:\n  gateway:\n    image: [unclosed\n")
    assert validate(broken).returncode != 0


# --- services, commands, environment --------------------------------------------------------------------

def test_the_stack_has_redis_both_workers_and_the_gateway_by_default():
    default = {name for name, s in SERVICES.items() if not s.get("profiles")}
    assert set(CORE) <= default
    assert set(app_services()) == {"vision-worker", "lm-worker", "lm-worker-gpu", "gateway"}


@pytest.mark.parametrize("name", ["vision-worker", "lm-worker", "lm-worker-gpu", "gateway"])
def test_service_commands_are_console_scripts(name):
    module = entry_module(name)
    assert callable(module.main) and callable(module.parse_args)


@pytest.mark.parametrize("name", ["vision-worker", "lm-worker", "lm-worker-gpu", "gateway"])
def test_every_variable_a_service_sets_is_read_by_that_service(name, monkeypatch):
    args, read = parsed_flags(name, monkeypatch)  # also: every value parses (types, choices)
    package = SCRIPTS[command(SERVICES[name])[0]].split(".")[0]
    known = read | string_literals(package, "serving")
    unread = set(environment(SERVICES[name])) - known
    assert not unread, f"{name} sets variables its code never reads: {sorted(unread)}"
    assert args.host == "0.0.0.0", f"{name} must listen on every interface inside its container"


@pytest.mark.parametrize("name", ["vision-worker", "lm-worker", "lm-worker-gpu"])
def test_workers_load_the_demo_model_baked_into_the_image(name, monkeypatch):
    args, _ = parsed_flags(name, monkeypatch)
    assert args.model == dockerfile_env()["GEMMA3_MODEL"] == demo_model_destination()
    assert args.redis_url.startswith("redis://redis:6379")


# --- ports, targets, health ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vision-worker", "lm-worker", "lm-worker-gpu", "gateway"])
def test_ports_match_the_flags_and_health_checks(name, monkeypatch):
    args, _ = parsed_flags(name, monkeypatch)
    service = SERVICES[name]
    module = entry_module(name)
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], f"{name}: the health check must run the gRPC probe"
    target, grpc_service = test[4], test[5]
    assert port_of(target) == args.port, f"{name}: health check on {target}, service on {args.port}"
    assert grpc_service == module.SERVICE
    if "expose" in service:
        assert [int(p) for p in service["expose"]] == [args.port]
    for mapping in service.get("ports", []):
        assert int(interpolate(mapping).rsplit(":", 1)[1]) == args.port


def test_default_ports_are_the_documented_ones(monkeypatch):
    for name, port in [("gateway", 50051), ("lm-worker", 50052), ("vision-worker", 50053)]:
        module = entry_module(name)
        with monkeypatch.context() as m:
            m.setattr(os, "environ", {"GEMMA3_MODEL": "/m"})
            assert module.parse_args([]).port == port


def test_only_the_gateway_is_published_by_default():
    published = {name for name, s in SERVICES.items() if s.get("ports") and not s.get("profiles")}
    assert published == {"gateway"}


def test_gateway_targets_name_the_workers_and_their_ports(monkeypatch):
    args, _ = parsed_flags("gateway", monkeypatch)
    for target, worker in [(args.lm_target, "lm-worker"), (args.vision_target, "vision-worker")]:
        assert target.startswith("dns:///"), "dns:/// lets the gateway balance over scaled replicas"
        host = target[len("dns:///"):].rsplit(":", 1)[0]
        assert host == worker
        worker_args, _ = parsed_flags(worker, monkeypatch)
        assert port_of(target) == worker_args.port
    # the GPU worker answers to the same name, on the same port
    gpu = SERVICES["lm-worker-gpu"]
    assert "lm-worker" in gpu["networks"]["default"]["aliases"]
    assert parsed_flags("lm-worker-gpu", monkeypatch)[0].port == port_of(args.lm_target)


def test_the_lm_worker_can_embed_images_instead_of_a_vision_worker(monkeypatch):
    """README: GEMMA3_LM_EMBED_IMAGES=1 GEMMA3_VISION_TARGET=lm docker compose up --scale vision-worker=0."""
    given = {"GEMMA3_LM_EMBED_IMAGES": "1", "GEMMA3_VISION_TARGET": "lm"}
    for worker in ("lm-worker", "lm-worker-gpu"):
        assert parsed_flags(worker, monkeypatch, given)[0].embed_images
        assert not parsed_flags(worker, monkeypatch)[0].embed_images  # the default: a vision worker embeds
    assert parsed_flags("gateway", monkeypatch, given)[0].vision_target == "lm"


def probe_script() -> str:
    scripts = {s["healthcheck"]["test"][3] for s in app_services().values()}
    assert len(scripts) == 1, "one probe for every service"
    return scripts.pop()


def test_health_checks_speak_the_grpc_health_protocol():
    script = probe_script()
    assert "grpc_health.v1" in script and "HealthStub" in script and "SERVING" in script
    assert SERVICES["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name in CORE:
        check = SERVICES[name]["healthcheck"]
        assert {"interval", "timeout", "retries"} <= set(check)


def test_the_health_probe_against_a_running_gateway():
    """The exact probe compose runs: 0 for a SERVING service, non-zero otherwise."""
    script = probe_script()

    def probe(target, service):
        return subprocess.run([sys.executable, "-c", script, target, service], capture_output=True, text=True,
                              timeout=60).returncode

    with running_services.running("gateway", "gemma3serve.v1.Gateway") as (_, target):
        assert probe(target, "gemma3serve.v1.Gateway") == 0
        assert probe(target, "gemma3serve.v1.NoSuchService") != 0
    assert probe(target, "gemma3serve.v1.Gateway") != 0  # stopped


def test_depends_on_waits_for_health():
    for name, service in SERVICES.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on must name a condition"
        for dep, spec in depends.items():
            assert dep in SERVICES, f"{name} depends on undefined service {dep}"
            if "healthcheck" in SERVICES[dep]:
                assert spec.get("condition") == "service_healthy", f"{name} -> {dep}"
            if SERVICES[dep].get("profiles") and not service.get("profiles"):
                assert spec.get("required") is False, f"{name} needs {dep}, which only runs in a profile"
    assert set(SERVICES["gateway"]["depends_on"]) >= {"vision-worker", "lm-worker"}
    for worker in ("vision-worker", "lm-worker", "lm-worker-gpu"):
        assert "redis" in SERVICES[worker]["depends_on"]


def test_redis_is_a_bounded_lru_cache():
    cmd = command(SERVICES["redis"])
    assert cmd[0] == "redis-server"
    assert cmd[cmd.index("--maxmemory") + 1], "--maxmemory needs a value"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "allkeys-lru"


# --- profiles ----------------------------------------------------------------------------------------------

def test_gpu_profile_reserves_nvidia_gpus_and_builds_the_cuda_variant():
    gpu = SERVICES["lm-worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert command(gpu) == command(SERVICES["lm-worker"])
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    variant = gpu["build"]["args"]["VARIANT"]
    assert variant == "cuda" and any("jax[cuda" in d for d in PYPROJECT["project"]["optional-dependencies"][variant])
    assert SERVICES["lm-worker"]["build"]["args"]["VARIANT"] == "cpu"
    assert gpu["image"] != SERVICES["lm-worker"]["image"]
    assert "VARIANT" in dockerfile_args("builder")


def test_tracing_profile_receives_otlp_from_every_service():
    tracing = {name: s for name, s in SERVICES.items() if "tracing" in s.get("profiles", [])}
    assert tracing, "a tracing profile"
    for name, service in app_services().items():
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" in service["environment"], name
        # empty unless asked for: no exporter, no retries against a collector that is not running
        assert environment(service)["OTEL_EXPORTER_OTLP_ENDPOINT"] == ""
    assert "otel-collector" in tracing and "4317" in [str(p) for p in tracing["otel-collector"]["expose"]]
    assert "http://otel-collector:4317" in COMPOSE.read_text()  # the documented value
    # the collector's own configuration: OTLP in, traces to Jaeger, metrics for Prometheus
    mount = next(v for v in tracing["otel-collector"]["volumes"] if "otel-collector.yaml" in v)
    config = yaml.safe_load((ROOT / mount.split(":")[0]).read_text())
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    pipelines = config["service"]["pipelines"]
    assert set(pipelines) == {"traces", "metrics"}
    for pipeline in pipelines.values():
        assert pipeline["receivers"] == ["otlp"]
        assert set(pipeline["exporters"]) <= set(config["exporters"])
        assert set(pipeline.get("processors", [])) <= set(config["processors"])
    jaeger = config["exporters"]["otlp/jaeger"]["endpoint"].split(":")[0]
    assert jaeger in tracing


# --- Dockerfile -----------------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, stage, pending = [], None, ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text, pending = pending + line, ""
        word, _, rest = text.strip().partition(" ")
        word = word.upper()
        if word == "FROM":
            parts = rest.split()
            stage = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
        out.append((stage, word, rest.strip()))
    return out


def dockerfile_args(stage: str) -> set[str]:
    return {rest.split("=")[0] for s, word, rest in dockerfile_instructions() if s == stage and word == "ARG"}


def dockerfile_env() -> dict[str, str]:
    env = {}
    for _, word, rest in dockerfile_instructions():
        if word == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


def copies() -> list[tuple[str, str | None, list[str], str]]:
    """(stage, --from or None, sources, destination) of every COPY."""
    out = []
    for stage, word, rest in dockerfile_instructions():
        if word != "COPY":
            continue
        words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        flags = dict(w[2:].split("=", 1) for w in words if w.startswith("--"))
        paths = [w for w in words if not w.startswith("--")]
        out.append((stage, flags.get("from"), paths[:-1], paths[-1]))
    return out


def dockerignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex over slash-separated paths (Go's filepath.Match, plus **)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i:]:
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "$")


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (or a folder above it) out of the build context."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.strip().startswith("#")]
    parts = Path(path.rstrip("/")).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = dockerignore_regex(pattern.lstrip("!").strip("/"))
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def demo_model_destination() -> str:
    return next(dest for _, source, paths, dest in copies() if source and paths == ["/src/demo/model"])


def test_dockerfile_stages_and_build_targets():
    stages = [s for s, word, _ in dockerfile_instructions() if word == "FROM"]
    assert stages == ["builder", "runtime"]
    for name, service in app_services().items():
        assert service["build"]["target"] in stages, name
        assert set(service["build"].get("args", {})) <= dockerfile_args("builder") & dockerfile_args("runtime")


def test_dockerfile_copy_sources_exist_and_are_in_the_build_context():
    stages = {s for s, word, _ in dockerfile_instructions() if word == "FROM"}
    context_copies = 0
    for _, source, paths, _ in copies():
        if source:
            assert source in stages, f"COPY --from={source}: no such stage"
            continue
        for path in paths:
            context_copies += 1
            assert (ROOT / path).exists(), f"COPY {path}: not in the repository"
            assert not dockerignored(path), f"COPY {path}: excluded by .dockerignore"
    assert context_copies


def test_dockerfile_copies_every_package_that_pyproject_installs():
    copied = {p.rstrip("/") for _, source, paths, _ in copies() if not source for p in paths}
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {d.name for d in ROOT.iterdir() if (d / "__init__.py").exists()
                and any(fnmatch.fnmatch(d.name, pattern) for pattern in include)}
    generated = {"gemma3serve"}  # written by protos/generate.py in the image
    assert packages - generated <= copied, f"not copied into the image: {sorted(packages - generated - copied)}"
    assert {"pyproject.toml", "protos"} <= copied


def test_the_demo_model_is_in_the_image():
    assert (ROOT / "demo" / "model" / "config.json").exists(), "the demo checkpoint is missing"
    copied_from_context = {p.rstrip("/") for _, source, paths, _ in copies() if not source for p in paths}
    assert "demo" in copied_from_context


def test_dockerfile_runs_as_a_user_and_its_commands_exist():
    runtime = [(word, rest) for stage, word, rest in dockerfile_instructions() if stage == "runtime"]
    user = [rest for word, rest in runtime if word == "USER"]
    assert user and user[-1] not in ("root", "0"), "the runtime stage must not run as root"
    cmd = json.loads(next(rest for word, rest in runtime if word == "CMD"))
    assert cmd[0] in SCRIPTS
    assert not any(word == "ENTRYPOINT" for word, _ in runtime), "compose sets the whole command"
    generate = [rest for stage, word, rest in dockerfile_instructions() if word == "RUN" and "generate.py" in rest]
    assert generate and (ROOT / "protos" / "generate.py").exists()
    for name in set(dockerfile_env()) - {"PATH"}:
        assert name.startswith(("PYTHON", "PIP_")) or name in string_literals("lm_worker", "vision_worker",
                                                                               "gateway", "serving"), name


def test_dockerignore_keeps_local_state_out():
    for path in (".venv", ".git", ".pytest_cache", "gateway/__pycache__", "serving/x.pyc", "bench"):
        assert dockerignored(path), path
    for path in ("gateway/__main__.py", "demo/model/config.json", "pyproject.toml"):
        assert not dockerignored(path), path
