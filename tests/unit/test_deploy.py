"""The deployment files against the code they deploy: no Docker engine or cluster needed.

Nothing here builds an image or starts a container. Instead every file is parsed and checked
against what it describes: ports against `Settings`' defaults, commands against the real CLI
parser and settings merge, CNNSERVE_* variables against the settings' fields, the dashboard's
queries against the metrics `service/metrics.py` really registers, Prometheus, Grafana and Envoy
targets against the Compose service names, and every Kubernetes manifest against the Kubernetes
schemas (kubernetes-validate, strict: unknown fields fail). Where `promtool` is installed (Debian
package `prometheus`), the Prometheus config and every dashboard query are also parsed by
Prometheus' own parser. `tests/integration/test_healthcheck.py` runs the health check script
and the image's command for real.
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import importlib.util
import json
import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from prometheus_client import REGISTRY  # noqa: E402

from service import cli, config, metrics  # noqa: E402
from service.config import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DEFAULTS = Settings()
SETTING_VARIABLES = {config.ENV_PREFIX + f.name.upper() for f in fields(Settings)}
# The oldest Kubernetes the manifests promise to fit (gRPC probes are GA since 1.27) and the
# newest the installed kubernetes-validate knows.
K8S_VERSIONS = ("1.28", kubernetes_validate.latest_version())


# Loading --------------------------------------------------------------------------------------


class Reset(list):  # type: ignore[type-arg]
    """Compose's `!reset []`: the override replaces the list instead of adding to it."""


class ComposeLoader(yaml.SafeLoader):
    """YAML as Compose reads it, with its `!reset` tag (on lists: the override uses no other)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset(loader.construct_sequence(node)))


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def merge(base: Any, over: Any) -> Any:
    """Compose's merge of an override file: maps merge, lists add unless `!reset`."""
    if isinstance(over, Reset):
        return list(over)
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for key, value in over.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(over, list):
        return base + [item for item in over if item not in base]
    return over


@cache
def compose() -> dict[str, Any]:
    return load_yaml(ROOT / "docker-compose.yml")


@cache
def compose_replicas() -> dict[str, Any]:
    return merge(compose(), load_yaml(ROOT / "docker-compose.replicas.yml"))


def service(name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return (spec or compose())["services"][name]


def published(spec: dict[str, Any]) -> dict[int, int]:
    """Container port -> host port, from Compose's short syntax ("[IP:]HOST:CONTAINER")."""
    ports = {}
    for entry in spec.get("ports", []):
        *host, container = str(entry).split(":")
        ports[int(container)] = int(host[-1]) if host else int(container)
    return ports


def mounts(spec: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path of each bind mount (short syntax)."""
    result = {}
    for entry in spec.get("volumes", []):
        source, target, *_ = str(entry).split(":")
        if source.startswith((".", "/")):
            result[target] = source
    return result


def project() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def image_name() -> str:
    """One image name everywhere: `cnnserve:<the project's version>`."""
    return f"cnnserve:{project()['project']['version']}"


# The Dockerfile -------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, f"stage {self.name}: expected one {keyword}, found {found}"
        return found[0]

    def args(self) -> dict[str, str]:
        values = {}
        for rest in self.all("ARG"):
            name, _, default = rest.partition("=")
            values[name] = default.strip('"')
        return values


def parse_dockerfile(text: str) -> dict[str, Stage]:
    """Stages by name, each a list of (INSTRUCTION, arguments) with continuations joined."""
    logical, buffer = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1].strip() + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    stages: dict[str, Stage] = {}
    global_args: dict[str, str] = {}
    current: Stage | None = None
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+) AS (\S+)", rest, re.IGNORECASE)
            assert match, f"every stage needs a name: FROM {rest}"
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], match[1])
            current = stages[match[2]] = Stage(match[2], base)
        elif current is None:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            name, _, default = rest.partition("=")
            global_args[name] = default
        else:
            current.instructions.append((keyword, rest))
    return stages


@cache
def dockerfile() -> dict[str, Stage]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


def entrypoint_argv(arguments: list[str]) -> list[str]:
    """What the image runs with `arguments` as its CMD, less the program name."""
    entrypoint = json.loads(dockerfile()["runtime"].one("ENTRYPOINT"))
    assert entrypoint[0] == "cnnserve"
    return [*entrypoint[1:], *arguments]


def serve_settings(arguments: list[str], environ: dict[str, str]) -> Settings:
    """The settings `cnnserve serve` would run with: the real parser and the real merge."""
    args = cli.build_parser().parse_args(entrypoint_argv(arguments))
    assert args.command == "serve"
    return config.from_args(args, environ=environ)


def healthcheck_command() -> list[str]:
    rest = dockerfile()["runtime"].one("HEALTHCHECK")
    options, _, command = rest.partition(" CMD ")
    assert command, f"HEALTHCHECK without CMD: {rest}"
    return json.loads(command)


def test_dockerfile_has_an_export_and_a_runtime_stage() -> None:
    stages = dockerfile()
    assert list(stages) == ["export", "runtime"]
    assert all(stage.base == "python:3.11-slim" for stage in stages.values())
    assert service("cnnserve")["build"]["target"] == "runtime"


def test_export_stage_installs_pinned_cpu_torch_and_exports_to_models() -> None:
    export = dockerfile()["export"]
    runs = export.all("RUN")
    torch_pin = next(
        d for d in project()["project"]["optional-dependencies"]["export"] if "torch" in d
    )
    assert any(torch_pin in run and "download.pytorch.org/whl/cpu" in run for run in runs)
    assert any('pip install ".[export]"' in run for run in runs)
    exporting = next(run for run in runs if "cnnserve-export" in run).split("&&")[0]
    words = re.sub(r"\$\{(\w+)\}", lambda m: export.args()[m[1]], exporting).split()
    argv = words[words.index("cnnserve-export") + 1 :]
    pytest.importorskip("torch")
    from export.cli import build_parser

    args = build_parser().parse_args(argv)
    assert args.command == "all" and args.quick
    assert args.model_repository == Path("/models")


def test_runtime_stage_has_no_torch_and_no_extras() -> None:
    runtime = dockerfile()["runtime"]
    installs = [run for run in runtime.all("RUN") if "pip install" in run]
    assert len(installs) == 1
    assert "torch" not in installs[0] and "[" not in installs[0]
    sources = [c.split()[0] for c in runtime.all("COPY") if not c.startswith("--from")]
    assert not any(source.startswith("export") for source in sources), "no export/ code"
    # `pip install .` is the serving install only if the project's own dependencies say so.
    dependencies = " ".join(project()["project"]["dependencies"])
    assert "torch" not in dependencies and not re.search(r"\bonnx\b(?!runtime)", dependencies)


def test_runtime_stage_takes_the_models_from_the_export_stage() -> None:
    runtime = dockerfile()["runtime"]
    copies = [c.split() for c in runtime.all("COPY") if c.startswith("--from=")]
    assert copies == [["--from=export", "/models", "/models"]]
    cmd = json.loads(runtime.one("CMD"))
    assert serve_settings(cmd, {}).model_repository == Path("/models")


def test_runtime_stage_runs_as_a_numeric_non_root_user() -> None:
    user = dockerfile()["runtime"].one("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "Kubernetes' runAsNonRoot needs a numeric uid"
    assert gid.isdigit() and int(gid) != 0


def test_runtime_stage_exposes_the_default_ports() -> None:
    exposed = {int(port) for port in dockerfile()["runtime"].one("EXPOSE").split()}
    assert exposed == {DEFAULTS.grpc_port, DEFAULTS.metrics_port}


def test_entrypoint_and_cmd_parse_with_the_real_cli() -> None:
    runtime = dockerfile()["runtime"]
    settings = serve_settings(json.loads(runtime.one("CMD")), {})
    assert settings.grpc_port == DEFAULTS.grpc_port
    assert settings.metrics_port == DEFAULTS.metrics_port
    assert settings.grpc_address == "0.0.0.0", "a container must listen beyond loopback"
    assert project()["project"]["scripts"]["cnnserve"] == "service.cli:main"


def test_healthcheck_runs_the_script_the_image_copies() -> None:
    command = healthcheck_command()
    copied = {
        parts[-1]: parts[-2]
        for parts in (c.split() for c in dockerfile()["runtime"].all("COPY"))
        if not parts[0].startswith("--from")
    }
    script = next(arg for arg in command if arg in copied)
    assert copied[script] == "deploy/healthcheck.py"
    assert command[0] == "python"


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(
            fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.split("/")[0], p) for p in patterns
        )

    for path in [".venv", "models", "samples", ".git", ".pytest_cache", "service/__pycache__"]:
        assert ignored(path), path
    sources = set()
    for stage in dockerfile().values():
        for copy_ in stage.all("COPY"):
            parts = [p for p in copy_.split() if not p.startswith("--")]
            if not copy_.startswith("--from"):
                sources.update(parts[:-1])
    assert sources >= {"pyproject.toml", "README.md", "service", "export", "deploy/healthcheck.py"}
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not ignored(source), f"{source} is copied but .dockerignore drops it"


# The health check script ----------------------------------------------------------------------


def test_healthcheck_script_defaults_to_the_grpc_port_and_needs_only_grpc() -> None:
    path = DEPLOY / "healthcheck.py"
    spec = importlib.util.spec_from_file_location("deploy_healthcheck", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.DEFAULT_PORT == DEFAULTS.grpc_port
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "argparse", "os", "sys", "grpc", "grpc_health"}


# docker-compose.yml ---------------------------------------------------------------------------


def test_compose_has_the_service_prometheus_and_grafana() -> None:
    assert set(compose()["services"]) == {"cnnserve", "prometheus", "grafana"}
    assert service("cnnserve")["image"] == image_name()


def test_compose_publishes_the_default_ports() -> None:
    ports = published(service("cnnserve"))
    assert ports == {
        DEFAULTS.grpc_port: DEFAULTS.grpc_port,
        DEFAULTS.metrics_port: DEFAULTS.metrics_port,
    }


def test_compose_command_and_environment_make_valid_settings() -> None:
    spec = service("cnnserve")
    environment = {key: str(value) for key, value in spec["environment"].items()}
    settings = serve_settings(spec["command"], environment)
    assert settings.model_repository == Path("/models")
    assert settings.grpc_port == DEFAULTS.grpc_port  # the published ports assume it
    assert settings.metrics_port == DEFAULTS.metrics_port
    assert settings.log_json is True


def test_compose_environment_names_only_real_settings() -> None:
    named = {key for key in service("cnnserve")["environment"] if key.startswith("CNNSERVE_")}
    commented = set(re.findall(r"#\s*(CNNSERVE_\w+):", (ROOT / "docker-compose.yml").read_text()))
    assert named and commented
    assert named | commented <= SETTING_VARIABLES, (named | commented) - SETTING_VARIABLES


def test_compose_documents_the_models_bind_mount() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    match = re.search(r"#\s*-\s*\./models:(\S+?)(?::ro)?$", text, re.MULTILINE)
    assert match, "the optional ./models bind mount is documented in a comment"
    assert Path(match[1]) == serve_settings(service("cnnserve")["command"], {}).model_repository


def test_compose_healthcheck_is_the_image_healthcheck() -> None:
    test = service("cnnserve")["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1:] == healthcheck_command()


def test_compose_stop_grace_period_outlasts_the_server_grace() -> None:
    spec = service("cnnserve")
    grace = float(spec["environment"]["CNNSERVE_GRACE_SECONDS"])
    assert float(spec["stop_grace_period"].rstrip("s")) > grace


def test_compose_mounts_the_prometheus_and_grafana_files() -> None:
    prometheus = service("prometheus")
    config_flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    config_path = config_flag.partition("=")[2]
    assert mounts(prometheus)[config_path] == "./deploy/prometheus/prometheus.yml"
    grafana = mounts(service("grafana"))
    assert grafana["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    for target, source in {**mounts(prometheus), **grafana}.items():
        assert (ROOT / source).exists(), f"{source} (mounted at {target}) is missing"


# Prometheus -----------------------------------------------------------------------------------


def scrape_targets() -> set[tuple[str, int]]:
    """(host, port) of each cnnserve target, from static or DNS service discovery."""
    prometheus = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "cnnserve")
    targets = set()
    for static in job.get("static_configs", []):
        for target in static["targets"]:
            host, _, port = target.rpartition(":")
            targets.add((host, int(port)))
    for dns in job.get("dns_sd_configs", []):
        assert dns.get("type", "SRV") == "A", "Compose DNS answers A records"
        targets.update((name, int(dns["port"])) for name in dns["names"])
    assert job.get("metrics_path", "/metrics") == "/metrics"
    return targets


def test_prometheus_scrapes_the_service_metrics_port() -> None:
    assert scrape_targets() == {("cnnserve", DEFAULTS.metrics_port)}
    assert "cnnserve" in compose()["services"]


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    result = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Grafana --------------------------------------------------------------------------------------


@cache
def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "cnnserve.json").read_text())


def datasource() -> dict[str, Any]:
    provisioned = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    (source,) = provisioned["datasources"]
    return source


def expressions() -> list[str]:
    """Every PromQL expression in the dashboard's panels."""
    found = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard()["panels"])
    return found


@cache
def exported_names() -> frozenset[str]:
    """Sample names the service's metrics module exposes, from the registry's families."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("cnnserve_") or family.name in metrics.TRITON_COUNTERS:
            names.update(family.name + s for s in suffixes.get(family.type, [""]))
    return frozenset(names)


def metric_names(expression: str) -> set[str]:
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
    return set(re.findall(r"\b(?:cnnserve_|nv_)\w+|\bup\b(?=\s*\{)", without_strings))


def test_grafana_datasource_is_the_compose_prometheus() -> None:
    source = datasource()
    assert source["type"] == "prometheus"
    match = re.fullmatch(r"http://([\w-]+):(\d+)", source["url"])
    assert match, source["url"]
    assert match[1] in compose()["services"]
    assert int(match[2]) in published(service(match[1]))


def test_grafana_provider_loads_the_mounted_dashboards() -> None:
    provisioned = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "cnnserve.yml")
    (provider,) = provisioned["providers"]
    grafana = service("grafana")
    folder = mounts(grafana)[provider["options"]["path"]]
    assert (ROOT / folder / "cnnserve.json").is_file()
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert (
        home.parent == Path(provider["options"]["path"]) and (ROOT / folder / home.name).is_file()
    )


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    uid = datasource()["uid"]
    panels = [p for p in dashboard()["panels"] if p["type"] != "row"]
    assert len(panels) >= 8
    for panel in panels:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"]), panel["title"]
    for variable in dashboard()["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid


def test_dashboard_queries_name_metrics_the_service_exports() -> None:
    exported = exported_names() | {"up"}
    assert exported >= {"cnnserve_requests_total", "nv_inference_count"}
    queries = expressions() + [v["definition"] for v in dashboard()["templating"]["list"]]
    for query in queries:
        names = metric_names(query)
        assert names, f"no cnnserve metric in {query!r}"
        assert names <= exported, f"{sorted(names - exported)} not exported; in {query!r}"
    jobs = {
        j["job_name"] for j in load_yaml(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]
    }
    for query in queries:
        assert set(re.findall(r'job="([^"]+)"', query)) <= jobs, query


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    text = "\n".join(expressions())
    wanted = [
        r"rate\(cnnserve_requests_total\{[^}]*\}\[",  # request rate
        r"histogram_quantile\(0\.5, .*cnnserve_request_duration_seconds_bucket",
        r"histogram_quantile\(0\.99, .*cnnserve_request_duration_seconds_bucket",
        r"cnnserve_batch_size_sum.*/.*cnnserve_batch_size_count",  # mean batch size
        r"cnnserve_batch_size_bucket",  # batch size distribution
        r"cnnserve_queue_depth",
        r"cnnserve_inflight_requests",
        r'by \(model, code\).*code!="OK"',  # errors by code
        r"cnnserve_images_total",
        r"cnnserve_model_state",
        r"cnnserve_model_info",
    ]
    for pattern in wanted:
        assert re.search(pattern, text), pattern


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    rules = [
        {
            "record": f"dashboard:query_{i}",
            "expr": query.replace("$__rate_interval", "1m").replace("$model", ".*"),
        }
        for i, query in enumerate(expressions())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Replicas behind Envoy ------------------------------------------------------------------------


@cache
def envoy() -> dict[str, Any]:
    return load_yaml(DEPLOY / "envoy" / "envoy.yaml")


def test_replicas_publish_only_through_envoy() -> None:
    merged = compose_replicas()
    assert published(service("cnnserve", merged)) == {}, "replicas cannot share host ports"
    proxy = service("envoy", merged)
    assert published(proxy)[DEFAULTS.grpc_port] == DEFAULTS.grpc_port
    config_path = proxy["command"][proxy["command"].index("--config-path") + 1]
    assert mounts(proxy)[config_path] == "./deploy/envoy/envoy.yaml"
    assert proxy["depends_on"]["cnnserve"]["condition"] == "service_healthy"
    # The single-replica compose file is untouched by the override's parsing.
    assert published(service("cnnserve"))


def test_envoy_balances_grpc_over_the_compose_service() -> None:
    (listener,) = envoy()["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == DEFAULTS.grpc_port
    (cluster,) = envoy()["static_resources"]["clusters"]
    assert cluster["type"] == "STRICT_DNS" and cluster["lb_policy"] == "ROUND_ROBIN"
    options = cluster["typed_extension_protocol_options"]
    http = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in http["explicit_http_config"]
    endpoints = [
        e["endpoint"]["address"]["socket_address"]
        for group in cluster["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    ]
    assert endpoints == [{"address": "cnnserve", "port_value": DEFAULTS.grpc_port}]
    (health,) = cluster["health_checks"]
    assert health["grpc_health_check"].get("service_name", "") == ""
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert {route["route"]["cluster"] for route in routes} == {cluster["name"]}
    assert all(route["route"]["timeout"] == "0s" for route in routes), "streams must not time out"


# Kubernetes -----------------------------------------------------------------------------------


def manifests(folder: Path = K8S) -> dict[str, list[dict[str, Any]]]:
    """Every Kubernetes document under `folder` by file, less kustomize's own files."""
    found = {}
    for path in sorted(folder.rglob("*.yaml")):
        docs = [d for d in load_all(path) if d["kind"] not in ("Kustomization", "Component")]
        if docs:
            found[str(path.relative_to(ROOT))] = docs
    return found


FILES = {
    "ConfigMap": "configmap.yaml",
    "Deployment": "deployment.yaml",
    "Service": "service.yaml",
    "HorizontalPodAutoscaler": "hpa.yaml",
    "PodDisruptionBudget": "pdb.yaml",
}


def resource(kind: str, name: str | None = None) -> dict[str, Any]:
    docs = [d for d in load_all(K8S / FILES[kind]) if d["kind"] == kind]
    return next(d for d in docs if name is None or d["metadata"]["name"] == name)


def validate(doc: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        caught = error.caught
        where = "/".join(str(p) for p in getattr(caught, "absolute_path", []))
        pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {where}: {caught.message}")


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    return main


def strategic_merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Enough of kustomize's strategic merge for named lists (containers, volumes, mounts)."""
    merged = copy.deepcopy(target)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = strategic_merge(merged[key], value)
        elif isinstance(value, list) and all(isinstance(i, dict) and "name" in i for i in value):
            items = {item["name"]: item for item in merged.get(key, [])}
            for item in value:
                items[item["name"]] = strategic_merge(items.get(item["name"], {}), item)
            merged[key] = list(items.values())
        else:
            merged[key] = value
    return merged


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "path", [p for p in manifests() if not p.endswith("deployment-patch.yaml")]
)
def test_every_manifest_fits_the_kubernetes_schema(path: str, version: str) -> None:
    for doc in manifests()[path]:
        validate(doc, version)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    component = load_yaml(K8S / "models-pvc" / "kustomization.yaml")
    assert component["kind"] == "Component"
    for name in [*component["resources"], *(p["path"] for p in component["patches"])]:
        assert (K8S / "models-pvc" / name).is_file(), name


def test_deployment_runs_the_image_with_valid_settings() -> None:
    main = container(resource("Deployment"))
    assert main["image"] == image_name()
    environment = resource("ConfigMap")["data"]
    assert set(environment) <= SETTING_VARIABLES, set(environment) - SETTING_VARIABLES
    assert [ref["configMapRef"]["name"] for ref in main["envFrom"]] == [
        resource("ConfigMap")["metadata"]["name"]
    ]
    settings = serve_settings(main["args"], environment)
    assert settings.model_repository == Path("/models")
    ports = {port["name"]: port["containerPort"] for port in main["ports"]}
    assert ports == {"grpc": settings.grpc_port, "metrics": settings.metrics_port}


def test_probes_use_grpc_health_on_the_grpc_port() -> None:
    main = container(resource("Deployment"))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["grpc"]["port"] == DEFAULTS.grpc_port, probe
        assert main[probe]["grpc"].get("service", "") == "", probe


def test_deployment_matches_the_image_and_settings() -> None:
    deployment = resource("Deployment")
    pod = deployment["spec"]["template"]
    main = container(deployment)
    uid = dockerfile()["runtime"].one("USER").split(":")[0]
    assert pod["spec"]["securityContext"]["runAsUser"] == int(uid)
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    environment = resource("ConfigMap")["data"]
    limits, requests = main["resources"]["limits"], main["resources"]["requests"]
    assert int(environment["CNNSERVE_INTRA_OP_THREADS"]) == int(limits["cpu"])
    assert requests["cpu"] and requests["memory"]
    pre_stop = main["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = float(environment["CNNSERVE_GRACE_SECONDS"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(pre_stop[1]) + grace
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(DEFAULTS.metrics_port)
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()


def test_services_route_to_the_pods_ports() -> None:
    deployment = resource("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    named = {port["name"]: port["containerPort"] for port in container(deployment)["ports"]}
    main = resource("Service", "cnnserve")
    ports = {port["name"]: port for port in main["spec"]["ports"]}
    assert ports["grpc"]["port"] == DEFAULTS.grpc_port and ports["grpc"]["targetPort"] in named
    assert ports["metrics"]["port"] == DEFAULTS.metrics_port
    assert ports["metrics"]["targetPort"] in named
    assert main["metadata"]["annotations"]["prometheus.io/port"] == str(DEFAULTS.metrics_port)
    headless = resource("Service", "cnnserve-headless")
    assert headless["spec"]["clusterIP"] == "None"
    for svc in (main, headless):
        assert svc["spec"]["selector"].items() <= labels.items()


def test_autoscaler_scales_the_deployment_on_cpu() -> None:
    hpa = resource("HorizontalPodAutoscaler")
    deployment = resource("Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in container(deployment)["resources"]["requests"], "utilisation needs a request"
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    budget = resource("PodDisruptionBudget")
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_models_pvc_component_mounts_the_claim_over_the_repository(version: str) -> None:
    folder = K8S / "models-pvc"
    (claim,) = load_all(folder / "pvc.yaml")
    (patch,) = load_all(folder / "deployment-patch.yaml")
    deployment = strategic_merge(resource("Deployment"), patch)
    validate(deployment, version)
    spec = deployment["spec"]["template"]["spec"]
    volume = next(v for v in spec["volumes"] if "persistentVolumeClaim" in v)
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    mount = next(m for m in container(deployment)["volumeMounts"] if m["name"] == volume["name"])
    environment = resource("ConfigMap")["data"]
    repository = serve_settings(container(deployment)["args"], environment).model_repository
    assert Path(mount["mountPath"]) == repository and mount["readOnly"] is True


# KServe ---------------------------------------------------------------------------------------


@cache
def inference_service() -> dict[str, Any]:
    (doc,) = load_all(DEPLOY / "kserve" / "inferenceservice.yaml")
    return doc


def test_kserve_inference_service_runs_the_image_as_a_grpc_predictor() -> None:
    isvc = inference_service()
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["kind"] == "InferenceService"
    (predictor,) = isvc["spec"]["predictor"]["containers"]
    assert predictor["name"] == "kserve-container"
    assert predictor["image"] == image_name()
    assert predictor["ports"] == [
        {"name": "h2c", "containerPort": DEFAULTS.grpc_port, "protocol": "TCP"}
    ]
    environment = {env["name"]: env["value"] for env in predictor["env"]}
    assert set(environment) <= SETTING_VARIABLES
    settings = serve_settings(predictor["args"], environment)
    assert settings.grpc_port == DEFAULTS.grpc_port
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert predictor[probe]["grpc"]["port"] == DEFAULTS.grpc_port, probe
    annotations = isvc["metadata"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == str(DEFAULTS.metrics_port)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kserve_predictor_container_fits_the_kubernetes_schema(version: str) -> None:
    """KServe's CRD schema is not bundled, but its container is a core/v1 Container."""
    (predictor,) = inference_service()["spec"]["predictor"]["containers"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "kserve-predictor"},
        "spec": {"containers": [predictor]},
    }
    validate(pod, version)


def test_one_image_name_everywhere() -> None:
    (predictor,) = inference_service()["spec"]["predictor"]["containers"]
    images = {
        "docker-compose.yml": service("cnnserve")["image"],
        "deploy/k8s/deployment.yaml": container(resource("Deployment"))["image"],
        "deploy/kserve/inferenceservice.yaml": predictor["image"],
    }
    assert set(images.values()) == {image_name()}, images
