"""The deployment examples in config/examples/, each exercised.

Every YAML file (and every YAML block of the examples' READMEs) parses; every
sidecar config in them passes ``mtls-sidecar check`` in a copy of its folder
with the certificates it names generated on the spot (the Cloud Foundry one
through a fake SAP BTP Destination Service found via ``VCAP_SERVICES``); the
container wiring (Compose volumes, Kubernetes mounts and probes, the Cloud
Foundry sidecar process) matches the config it carries; the Kubernetes
manifests pass the Kubernetes schemas; and the scripts and the application
of the examples work against the demo, both through a changed base URL and
through ``http_proxy``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import aiohttp
import pytest
import yaml
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from prometheus_client import CollectorRegistry

from sidecar.cli import main
from sidecar.config import Config, parse_config
from sidecar.telemetry.metrics import SidecarMetrics
from tests.conftest import PKI, Demo, free_port, missing_tool, write_private
from tests.support.fake_btp import CLIENT_ID, CLIENT_SECRET, FakeBTP, destination_json, serve

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "config" / "examples"
FOLDERS = ("postman", "legacy-script", "docker-compose", "kubernetes", "cloud-foundry")
MONITORING = ("prometheus",)  # folders beside the setups: no sidecar config of their own
CONTAINER_CONFIG = PurePosixPath("/etc/mtls-sidecar/sidecar.yaml")  # the image's CMD
KUBERNETES_VERSION = "1.29"  # native sidecar containers are on by default from here

#: what the examples read from the environment (their READMEs say to export these)
ENV = {
    "SF_P12_PASSWORD": "p12 password of the example",
    "SF_UPSTREAM": "https://api10.cert.successfactors.com",
    "SF_COMPANY_ID": "ACME1234",
    "SIDECAR_INBOUND_TOKEN": "0123456789abcdef0123456789abcdef",
}
#: variables of the test machine that would change what the examples do
UNSET = ("SIDECAR_CONFIG", "VCAP_SERVICES", "SERVICE_BINDING_ROOT")
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


# ------------------------------------------------------------------ discovery


def yaml_files() -> list[Path]:
    return sorted([*EXAMPLES.rglob("*.yaml"), *EXAMPLES.rglob("*.yml")])


def readme_yaml_blocks() -> list[tuple[str, str]]:
    """(id, text) of every ```yaml block in the examples' READMEs."""
    blocks = []
    for readme in sorted(EXAMPLES.rglob("README.md")):
        texts = re.findall(r"```yaml\n(.*?)```", readme.read_text(), flags=re.S)
        rel = readme.relative_to(EXAMPLES).as_posix()
        blocks += [(f"{rel}#yaml{i + 1}", text) for i, text in enumerate(texts)]
    return blocks


@dataclass(frozen=True)
class Example:
    """A sidecar config found in the examples, and the folder it lives in."""

    id: str
    folder: str
    filename: str  # where the config is written in the folder's copy
    text: str

    @property
    def uses_destination(self) -> bool:
        return "destination:" in self.text


def _is_sidecar_config(doc: object) -> bool:
    return isinstance(doc, dict) and "routes" in doc


def sidecar_configs() -> list[Example]:
    """Config files, ConfigMap entries and README blocks that are sidecar configs."""
    found = []
    for path in yaml_files():
        folder = path.relative_to(EXAMPLES).parts[0]
        rel = path.relative_to(EXAMPLES).as_posix()
        text = path.read_text()
        for doc in yaml.safe_load_all(text):
            if _is_sidecar_config(doc):
                found.append(Example(rel, folder, path.name, text))
            elif isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
                for key, value in (doc.get("data") or {}).items():
                    if key.endswith(".yaml") and _is_sidecar_config(yaml.safe_load(value)):
                        found.append(Example(f"{rel}:data.{key}", folder, key, value))
    for block_id, text in readme_yaml_blocks():
        if _is_sidecar_config(yaml.safe_load(text)):
            found.append(Example(block_id, block_id.split("/")[0], "readme-example.yaml", text))
    return found


CONFIGS = sidecar_configs()
FILE_CONFIGS = [c for c in CONFIGS if not c.uses_destination]
DESTINATION_CONFIGS = [c for c in CONFIGS if c.uses_destination]


def load_yaml(rel: str) -> Any:
    return yaml.safe_load((EXAMPLES / rel).read_text())


def config_in(rel: str, filename: str = "sidecar.yaml") -> Example:
    return next(c for c in CONFIGS if c.id == rel or c.id == f"{rel}:data.{filename}")


# ----------------------------------------------------------- generating files


def materialize(example: Example, tmp_path: Path, pki: PKI) -> Path:
    """Copy the example's folder, write the config, generate every file it names."""
    folder = tmp_path / example.folder
    shutil.copytree(EXAMPLES / example.folder, folder)
    path = folder / example.filename
    path.write_text(example.text)
    config = parse_config(example.text, filename=path.name, base_dir=folder, env=ENV)
    for route in config.routes:
        creds = route.credentials
        for p in (*creds.files, route.tls.ca_file):
            assert p is None or p.is_relative_to(folder), f"{example.id}: {p} is not relative"
        password = ENV[creds.password_env].encode() if creds.password_env else None
        if creds.password_file is not None:
            password = b"password from a file"
            write_private(creds.password_file, password)
        if creds.pem is not None and creds.key is not None:
            write_private(creds.pem, pki.client.chain_pem())
            write_private(creds.key, pki.client.key_pem(password))
        elif creds.pem is not None:
            write_private(creds.pem, pki.client.btp_bundle(password))
        if creds.pkcs12 is not None:
            encryption: serialization.KeySerializationEncryption = (
                serialization.BestAvailableEncryption(password)
                if password
                else serialization.NoEncryption()
            )
            p12 = pkcs12.serialize_key_and_certificates(
                b"client", pki.client.key, pki.client.cert, list(pki.client.parents), encryption
            )
            write_private(creds.pkcs12, p12)
        if route.tls.ca_file is not None:
            write_private(route.tls.ca_file, pki.root.cert_pem())
    return path


def cli_env(**extra: str) -> dict[str, str | None]:
    env: dict[str, str | None] = {name: None for name in UNSET}
    env.update(ENV)
    env.update(extra)
    return env


def container_config(example: Example) -> Config:
    """The config as the container sees it: mounted at the image's config path."""
    return parse_config(
        example.text,
        filename=CONTAINER_CONFIG.name,
        base_dir=Path(CONTAINER_CONFIG.parent),
        env=ENV,
    )


def referenced_files(config: Config) -> list[PurePosixPath]:
    out = []
    for route in config.routes:
        out += [PurePosixPath(p) for p in route.credentials.files]
        if route.tls.ca_file is not None:
            out.append(PurePosixPath(route.tls.ca_file))
    return out


# ------------------------------------------------------------------- layout


def test_every_example_folder_has_a_readme_listed_in_the_index():
    folders = (*FOLDERS, *MONITORING)
    assert sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir()) == sorted(folders)
    index = (EXAMPLES / "README.md").read_text()
    for folder in folders:
        assert (EXAMPLES / folder / "README.md").is_file(), folder
    for folder in folders:
        assert f"]({folder}/)" in index, folder


@pytest.mark.parametrize(
    "readme", sorted(EXAMPLES.rglob("README.md")), ids=lambda p: str(p.relative_to(EXAMPLES))
)
def test_relative_links_in_the_readmes_exist(readme: Path):
    for target in re.findall(r"\]\(([^)#\s]+)\)", readme.read_text()):
        if "://" not in target:
            assert (readme.parent / target).exists(), f"{readme}: broken link {target}"


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_every_yaml_file_parses(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize(
    "text", [pytest.param(text, id=block_id) for block_id, text in readme_yaml_blocks()]
)
def test_every_yaml_block_of_the_readmes_parses(text: str):
    assert isinstance(yaml.safe_load(text), dict)


def test_every_folder_has_a_sidecar_config():
    assert {c.folder for c in CONFIGS} == set(FOLDERS)
    assert [c.folder for c in DESTINATION_CONFIGS] == ["cloud-foundry"]


# --------------------------------------------------------- mtls-sidecar check


@pytest.mark.parametrize("example", FILE_CONFIGS, ids=lambda c: c.id)
def test_config_passes_check_with_generated_certificates(
    example: Example, tmp_path: Path, pki: PKI
):
    path = materialize(example, tmp_path, pki)
    result = CliRunner().invoke(main, ["check", "-c", str(path)], env=cli_env())
    assert result.exit_code == 0, result.output
    assert "OK: 1 route(s) ready" in result.stdout
    assert "sidecar-technical-user" in result.stdout  # the generated certificate was loaded
    assert "warning" not in result.stderr, result.stderr


def test_check_really_reads_the_files(tmp_path: Path, pki: PKI):
    """The same check fails when the generated bundle is missing: nothing is skipped."""
    path = materialize(config_in("postman/sidecar.yaml"), tmp_path, pki)
    (path.parent / "certs" / "client-bundle.pem").unlink()
    result = CliRunner().invoke(main, ["check", "-c", str(path)], env=cli_env())
    assert result.exit_code == 2
    assert "client-bundle.pem" in result.stderr


@pytest.fixture
async def destination_service(pki: PKI) -> AsyncIterator[tuple[FakeBTP, str]]:
    fake = FakeBTP()
    served = await serve(fake)
    yield fake, served.url
    await served.runner.cleanup()


def vcap_services(url: str, instance: str) -> str:
    credentials = {"uri": url, "url": url, "clientid": CLIENT_ID, "clientsecret": CLIENT_SECRET}
    entry = {"label": "destination", "name": instance, "plan": "lite", "credentials": credentials}
    return json.dumps({"destination": [entry]})


def manifest_app() -> dict[str, Any]:
    app: dict[str, Any] = load_yaml("cloud-foundry/manifest.yml")["applications"][0]
    return app


@pytest.mark.parametrize("example", DESTINATION_CONFIGS, ids=lambda c: c.id)
async def test_destination_config_passes_check_through_vcap_services(
    example: Example, tmp_path: Path, pki: PKI, destination_service: tuple[FakeBTP, str]
):
    fake, url = destination_service
    path = materialize(example, tmp_path, pki)
    (name,) = {r.credentials.destination.name for r in container_config(example).routes if
               r.credentials.destination}  # fmt: skip
    fake.destinations[name] = destination_json(
        name,
        url="https://api10.cert.successfactors.com",
        keystore=("sf-client.pem", pki.client.btp_bundle()),
        headers={"successfactors-companyid": "ACME1234"},
    )
    (instance,) = manifest_app()["services"]
    env = cli_env(VCAP_SERVICES=vcap_services(url, instance))
    result = await asyncio.to_thread(CliRunner().invoke, main, ["check", "-c", str(path)], env=env)
    assert result.exit_code == 0, result.output
    assert "OK: 1 route(s) ready" in result.stdout
    assert f"destination {name}" in result.stdout
    assert "sidecar-technical-user" in result.stdout
    assert fake.destination_calls >= 1 and fake.token_calls >= 1

    # A destination the service does not know stops the route, as `run` would.
    fake.destinations.clear()
    result = await asyncio.to_thread(CliRunner().invoke, main, ["check", "-c", str(path)], env=env)
    assert result.exit_code == 2, result.output
    assert name in result.stderr


# -------------------------------------------------------------- Docker Compose


def test_compose_runs_the_app_in_the_sidecars_network_namespace():
    compose = load_yaml("docker-compose/compose.yaml")
    services = compose["services"]
    assert set(services) == {"sidecar", "app"}
    app, sidecar = services["app"], services["sidecar"]
    assert app["network_mode"] == "service:sidecar"
    assert app["depends_on"]["sidecar"]["condition"] == "service_healthy"
    # The sidecar is built from this repository and runs the image's own command.
    assert (EXAMPLES / "docker-compose" / sidecar["build"] / "Dockerfile").is_file()
    assert "command" not in sidecar and "entrypoint" not in sidecar
    assert sidecar["read_only"] is True
    assert "ports" not in sidecar  # loopback is shared with the app; nothing is published


def _compose_volumes(service: Mapping[str, Any]) -> dict[PurePosixPath, tuple[str, str]]:
    out = {}
    for spec in service["volumes"]:
        source, target, mode = spec.split(":")
        out[PurePosixPath(target)] = (source, mode)
    return out


def test_compose_mounts_the_example_config_and_every_file_it_names():
    sidecar = load_yaml("docker-compose/compose.yaml")["services"]["sidecar"]
    volumes = _compose_volumes(sidecar)
    source, mode = volumes[CONTAINER_CONFIG]
    assert (EXAMPLES / "docker-compose" / source).resolve() == (
        EXAMPLES / "docker-compose" / "sidecar.yaml"
    )
    assert all(m == "ro" for _, m in volumes.values())
    example = config_in("docker-compose/sidecar.yaml")
    files = referenced_files(container_config(example))
    assert files
    for f in files:
        assert any(f.is_relative_to(t) for t in volumes if t != CONTAINER_CONFIG), f
    # every ${VAR} of the config is handed to the container
    for name in re.findall(r"\$\{(\w+)\}", example.text):
        assert name in sidecar["environment"], name


def test_compose_config_listens_where_the_image_healthcheck_asks():
    route = container_config(config_in("docker-compose/sidecar.yaml")).routes[0]
    assert str(route.listen) == "127.0.0.1:8080"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert '"http://127.0.0.1:8080/-/ready"' in dockerfile


# ----------------------------------------------------------------- Kubernetes


def kubernetes_docs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted((EXAMPLES / "kubernetes").glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                docs.append((f"{path.name}[{i}] {doc['kind']}", doc))
    return docs


def _kubernetes_validate() -> Any:
    return pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate (PyPI; ships the Kubernetes JSON schemas) is not "
        "installed: python3 -m pip install kubernetes-validate",
    )


@pytest.mark.parametrize("doc", [pytest.param(doc, id=name) for name, doc in kubernetes_docs()])
def test_kubernetes_manifest_passes_the_schema(doc: dict[str, Any]):
    kv = _kubernetes_validate()
    assert kv.validate(doc, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION


def test_the_schema_check_catches_a_misspelled_field():
    kv = _kubernetes_validate()
    deployment = next(d for _, d in kubernetes_docs() if d["kind"] == "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["initContainers"][0]["readinesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, KUBERNETES_VERSION, strict=True)


def _pod() -> dict[str, Any]:
    deployment = next(d for _, d in kubernetes_docs() if d["kind"] == "Deployment")
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return pod


def _sidecar_container(pod: Mapping[str, Any]) -> dict[str, Any]:
    containers = [*pod.get("initContainers", []), *pod["containers"]]
    (sidecar,) = [c for c in containers if "mtls-sidecar" in c["image"]]
    found: dict[str, Any] = sidecar
    return found


def test_kubernetes_sidecar_runs_the_config_from_the_configmap():
    pod = _pod()
    sidecar = _sidecar_container(pod)
    if sidecar in pod.get("initContainers", []):
        assert sidecar["restartPolicy"] == "Always"  # a native sidecar, not a one-shot init
    assert sidecar["args"][:3] == ["run", "-c", str(CONTAINER_CONFIG)]
    assert sidecar["args"][3:] == ["--log-format", "json"]
    mounts = {PurePosixPath(m["mountPath"]): m for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_mount = mounts[CONTAINER_CONFIG]
    configmap_name = volumes[config_mount["name"]]["configMap"]["name"]
    (configmap,) = [d for _, d in kubernetes_docs() if d["kind"] == "ConfigMap"]
    assert configmap["metadata"]["name"] == configmap_name
    assert config_mount["subPath"] in configmap["data"]


def test_kubernetes_bundle_comes_from_a_secret_volume_that_can_rotate():
    pod = _pod()
    sidecar = _sidecar_container(pod)
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret_mounts = [m for m in sidecar["volumeMounts"] if "secret" in volumes[m["name"]]]
    assert secret_mounts
    for mount in secret_mounts:
        assert mount["readOnly"] is True
        assert "subPath" not in mount  # a subPath mount never sees the Secret change
    files = referenced_files(container_config(config_in("kubernetes/configmap.yaml")))
    assert files
    for f in files:
        assert any(f.is_relative_to(m["mountPath"]) for m in secret_mounts), f


def test_kubernetes_probes_ask_ready_and_health_on_the_sidecar_port():
    sidecar = _sidecar_container(_pod())
    route = container_config(config_in("kubernetes/configmap.yaml")).routes[0]
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}

    def probe(kind: str) -> tuple[str, int]:
        get = sidecar[kind]["httpGet"]
        port = get["port"]
        return get["path"], ports[port] if isinstance(port, str) else port

    assert probe("readinessProbe") == ("/-/ready", route.listen.port)
    assert probe("livenessProbe") == ("/-/health", route.listen.port)
    assert probe("startupProbe") == ("/-/ready", route.listen.port)
    # Probes come from the kubelet, off the pod's loopback: the listener is remote and
    # therefore token-protected, and the token reaches the container.
    assert not route.listen.is_loopback
    assert route.inbound.allow_remote and route.inbound.token_env
    assert route.inbound.token_env in {e["name"] for e in sidecar["env"]}


def test_kubernetes_runs_non_root_with_a_read_only_root_filesystem():
    pod = _pod()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]


# -------------------------------------------------------------- Cloud Foundry


def test_cloud_foundry_manifest_has_the_sidecar_process_and_the_binding():
    app = manifest_app()
    (sidecar,) = app["sidecars"]
    assert sidecar["process_types"] == ["web"]
    assert sidecar["command"] == "mtls-sidecar run -c sidecar.yaml"
    assert (EXAMPLES / "cloud-foundry" / "sidecar.yaml").is_file()
    assert len(app["services"]) == 1
    route = container_config(config_in("cloud-foundry/sidecar.yaml")).routes[0]
    assert route.credentials.destination is not None
    assert route.credentials.destination.service_key is None  # VCAP_SERVICES, not a file
    assert route.listen.is_loopback
    assert route.listen.port != 8080  # Cloud Foundry gives the application PORT=8080
    assert app["env"]["SF_BASE_URL"] == f"http://{route.listen}"


def test_cloud_foundry_requirements_name_the_wheel_of_this_version():
    from sidecar import __version__

    lines = (EXAMPLES / "cloud-foundry" / "requirements.txt").read_text().splitlines()
    wheels = [line for line in lines if line.endswith(".whl")]
    assert wheels == [f"./wheels/mtls_sidecar-{__version__}-py3-none-any.whl"]


# ----------------------------------------------------------- Prometheus rules

RULES = EXAMPLES / "prometheus" / "rules.yaml"
#: Prometheus' duration format (with at least one unit)
DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")
#: the keys a Prometheus alerting rule may have
RULE_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
#: labels every sidecar series has once scraped: its own, and Prometheus' target labels
SERIES_LABELS = {"route", "instance", "job"}


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule for group in load_yaml("prometheus/rules.yaml")["groups"] for rule in group["rules"]
    ]


def exported_metric_names() -> set[str]:
    """Every series name a sidecar's /-/metrics can hold (a counter's ``_total`` too)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count")}
    registry: CollectorRegistry = SidecarMetrics().registry
    names = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ()))
    return names


def test_prometheus_rules_have_the_rule_file_structure():
    doc = load_yaml("prometheus/rules.yaml")
    assert set(doc) == {"groups"}
    names = [group["name"] for group in doc["groups"]]
    assert len(names) == len(set(names)) and all(isinstance(n, str) and n for n in names)
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "limit", "rules"}, group["name"]
        assert isinstance(group["rules"], list) and group["rules"], group["name"]
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules), "alert names repeat"
    for rule in rules:
        name = rule.get("alert")
        assert isinstance(name, str) and re.fullmatch(r"[A-Z][A-Za-z0-9]+", name), rule
        assert set(rule) == RULE_KEYS - {"keep_firing_for"}, f"{name}: {set(rule)}"
        assert isinstance(rule["expr"], str) and rule["expr"].strip(), name
        assert rule["expr"].count("(") == rule["expr"].count(")"), name
        assert DURATION.fullmatch(rule["for"]), f"{name}: for: {rule['for']!r}"
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert all(isinstance(v, str) for v in rule["labels"].values()), name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description"}, name
        for text in annotations.values():
            assert isinstance(text, str) and text.count("{{") == text.count("}}"), name
            used = set(re.findall(r"\$labels\.(\w+)", text))
            assert used <= SERIES_LABELS, f"{name}: labels the series do not have: {used}"
        assert "cert export-public" in annotations["description"], f"{name}: what to do?"


def test_prometheus_rules_name_metrics_the_sidecar_exports():
    exported = exported_metric_names()
    assert "sidecar_requests_total" in exported  # the walk over the registry works
    for rule in alert_rules():
        named = set(re.findall(r"\bsidecar_\w+", rule["expr"]))
        assert named, f"{rule['alert']} watches no sidecar metric"
        assert named <= exported, f"{rule['alert']}: not exported: {named - exported}"


def test_prometheus_rules_thresholds_and_readme_agree():
    rules = {r["alert"]: r for r in alert_rules()}
    pending = rules["SidecarRenewedCertificateNotAccepted"]
    assert pending["expr"] == "sidecar_client_cert_pending == 1" and pending["for"] == "1h"
    expiry = {
        r["labels"]["severity"]: r["expr"]
        for r in rules.values()
        if "sidecar_client_cert_not_after_seconds" in r["expr"]
    }
    assert expiry == {
        "warning": "sidecar_client_cert_not_after_seconds - time() < 14 * 86400",
        "critical": "sidecar_client_cert_not_after_seconds - time() < 3 * 86400",
    }
    readme = (EXAMPLES / "prometheus" / "README.md").read_text()
    for name, rule in rules.items():
        assert f"| `{name}` |" in readme, f"the README's table lacks {name}"
        assert rule["labels"]["severity"] in readme
    assert "`sidecar_client_cert_pending == 1`" in readme
    assert "`sidecar_client_cert_not_after_seconds - time() < 14 * 86400`" in readme


def test_prometheus_rules_pass_promtool(tmp_path: Path):
    promtool = shutil.which("promtool")
    if promtool is None:
        missing_tool("promtool is not installed (Prometheus' own checker)", ci_installs_it=False)
    proc = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------- scripts and app against the demo


def script_env(**extra: str) -> dict[str, str]:
    """The test's environment without proxy settings of its own, plus ``extra``."""
    drop = {*PROXY_VARS, *(v.upper() for v in PROXY_VARS)}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


async def run(*argv: str, env: Mapping[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=dict(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=EXAMPLES / "legacy-script",
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _need_requests() -> None:
    pytest.importorskip(
        "requests", reason="the example script uses requests: python3 -m pip install requests"
    )


def _need_curl() -> str:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    return curl


def _ways(demo: Demo) -> Iterator[tuple[str, dict[str, str]]]:
    yield "base URL", script_env(SF_BASE_URL=demo.url)
    # http_proxy: the script keeps the upstream's host, with http://, and the sidecar
    # serves the absolute-form request for that host only.
    upstream_host = f"http://localhost:{demo.upstream.port}"
    yield "http_proxy", script_env(SF_BASE_URL=upstream_host, http_proxy=demo.url)


async def test_requests_script_pages_through_every_user_both_ways(demo: Demo):
    _need_requests()
    for way, env in _ways(demo):
        code, out, err = await run(sys.executable, "users.py", env=env)
        assert code == 0, f"{way}: {err}"
        lines = out.splitlines()
        assert lines[-1] == "45 users", f"{way}: {out}"
        assert lines[0].startswith("u0001 "), way
        assert len(set(lines[:-1])) == 45, way  # three pages, no page twice


async def test_curl_script_lists_users_both_ways(demo: Demo):
    _need_curl()
    for way, env in _ways(demo):
        code, out, err = await run("sh", "users.sh", env=env)
        assert code == 0, f"{way}: {err}"
        users = json.loads(out)["d"]["results"]
        assert [u["userId"] for u in users] == ["u0001", "u0002", "u0003", "u0004", "u0005"]


async def test_https_through_the_proxy_is_refused_as_the_readme_says(demo: Demo):
    """An https:// URL makes requests open a CONNECT tunnel, which the sidecar refuses."""
    _need_requests()
    code = (
        "import requests, sys\n"
        "try:\n"
        "    requests.get(sys.argv[1], timeout=10)\n"
        "except requests.exceptions.ProxyError as exc:\n"
        "    print('refused:', exc)\n"
    )
    url = f"https://localhost:{demo.upstream.port}/odata/v2/User"
    status, out, err = await run(
        sys.executable, "-c", code, url, env=script_env(https_proxy=demo.url)
    )
    assert status == 0, err
    assert out.startswith("refused:") and "403" in out, out


async def test_cloud_foundry_app_reads_users_through_the_sidecar(demo: Demo):
    port = free_port()
    env = script_env(PORT=str(port), SF_BASE_URL=demo.url)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / "cloud-foundry" / "app.py"), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as client:
            for _ in range(100):
                try:
                    async with client.get(f"http://127.0.0.1:{port}/health") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
            async with client.get(f"http://127.0.0.1:{port}/") as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
        assert len(body["users"]) == 5
    finally:
        proc.terminate()
        await proc.wait()
