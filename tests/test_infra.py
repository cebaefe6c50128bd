"""The cluster manifests in infra/, validated offline: kustomize renders them, the Kubernetes
schemas accept them, and they use the settings names, ports and pools the code uses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml
from prefect.utilities.templating import apply_values

from tasks.settings import TOOLING_VARIABLES, Settings
from tests.conftest import ROOT

INFRA = ROOT / "infra"
K8S_VERSION = "1.32.0"
SETTINGS = {f"DOCSRAG_{name.upper()}" for name in Settings.model_fields} | TOOLING_VARIABLES
DEFAULTS = Settings.model_construct()  # the defaults, without reading the environment


def validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def pools() -> set[str]:
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {pool["name"] for pool in config["definitions"]["work_pools"].values()}


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed: it renders infra/k8s offline (kubectl kustomize)")
    out = subprocess.run(["kubectl", "kustomize", str(INFRA / "k8s")], capture_output=True, text=True, check=True)
    return list(yaml.safe_load_all(out.stdout))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "compose" / "docker-compose.yaml").read_text())


def test_kustomize_output_passes_the_kubernetes_schemas(rendered):
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered}
    assert {("Deployment", "prefect-worker-cpu"), ("Deployment", "prefect-worker-gpu"), ("Deployment", "vllm"),
            ("Service", "vllm"), ("ConfigMap", "docsrag-config"), ("Role", "prefect-worker")} <= kinds
    for doc in rendered:
        validate(doc)
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "docsrag"


def test_workers_serve_the_pools_of_prefect_yaml(rendered, compose):
    k8s = {d["spec"]["template"]["spec"]["containers"][0]["command"][4]
           for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"].startswith("prefect-worker")}
    local = {s["command"].split("--pool ")[1].split()[0] for n, s in compose["services"].items()
             if n.startswith("worker-")}
    assert k8s == local == pools()


def test_vllm_serves_gpt_oss_on_a_gpu_at_the_port_docsrag_calls(rendered, compose):
    port = urlparse(DEFAULTS.llm_base_url).port
    deployment = next(d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"] == "vllm")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"]
    assert DEFAULTS.llm_model in container["args"] and str(port) in container["args"]
    assert container["ports"][0]["containerPort"] == port
    config = next(d for d in rendered if d["kind"] == "ConfigMap")["data"]
    assert urlparse(config["DOCSRAG_LLM_BASE_URL"]).port == port
    assert compose["services"]["vllm"]["ports"] == [f"{port}:{port}"]
    assert DEFAULTS.llm_model in compose["services"]["vllm"]["command"]


def test_gpu_base_job_template_renders_a_valid_gpu_job():
    template = json.loads((INFRA / "k8s" / "gpu-base-job-template.json").read_text())
    variables = template["variables"]["properties"]
    values = {name: spec["default"] for name, spec in variables.items() if "default" in spec}
    # what the worker fills in for a flow run: a name, the command as a list, env as name/value pairs
    values.update(name="answer-questions-run", command=["prefect", "flow-run", "execute"],
                  env=[{"name": "PREFECT__FLOW_RUN_ID", "value": "0"}])
    job = apply_values(template["job_configuration"]["job_manifest"], values)
    validate(job)
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    # every placeholder of the job configuration is a declared variable
    placeholders = set(re.findall(r"\{\{ *(\w+) *\}\}", json.dumps(template["job_configuration"])))
    assert placeholders <= set(variables)


def test_every_docsrag_variable_in_infra_is_a_setting():
    files = [p for p in INFRA.rglob("*") if p.is_file() and p.suffix in {".yaml", ".json", ".py", ".env", ""}]
    names = {n for p in files for n in re.findall(r"\bDOCSRAG_[A-Z_]+\b", p.read_text())}
    assert names, "the manifests configure docsrag through DOCSRAG_* settings"
    assert names <= SETTINGS, f"unknown settings in infra/: {sorted(names - SETTINGS)}"


def test_compose_runs_the_whole_stack_and_keeps_secrets_out(compose):
    services = compose["services"]
    expected = {"etcd", "minio", "milvus", "postgres", "prefect-server", "worker-cpu", "worker-gpu", "vllm"}
    assert expected <= set(services)
    assert services["milvus"]["ports"] == ["19530:19530"] and services["prefect-server"]["ports"] == ["4200:4200"]
    env = services["worker-cpu"]["environment"]
    gpu_env = services["worker-gpu"]["environment"]
    assert env.items() <= gpu_env.items(), "both workers share the configuration"
    assert gpu_env["PREFECT_WORKER_QUERY_SECONDS"] == "1", "triggered answer runs start at once"
    assert urlparse(env["DOCSRAG_MILVUS_URI"]).port == 19530 and urlparse(env["PREFECT_API_URL"]).port == 4200
    secrets = [k for k in env if re.search(r"TOKEN|SECRET|KEY_ID|QUEUE_URL", k)]
    assert secrets and all("${" in env[k] for k in secrets), "secrets are interpolated from .env, never literal"
    assert services["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_helm_values_run_milvus_in_cluster_mode_on_external_s3(rendered):
    values = yaml.safe_load((INFRA / "helm" / "milvus-values.yaml").read_text())
    assert values["cluster"]["enabled"] and not values["minio"]["enabled"] and values["externalS3"]["enabled"]
    config = next(d for d in rendered if d["kind"] == "ConfigMap")["data"]
    assert values["externalS3"]["bucketName"] == config["DOCSRAG_MILVUS_BUCKET"]
    assert urlparse(config["DOCSRAG_MILVUS_URI"]).port == values["service"]["port"] == 19530
    assert "secretKey" not in json.dumps(values["externalS3"])  # credentials from an existing Secret


def test_the_cluster_runs_one_milvus_version_and_it_has_bm25(compose):
    """compose and helm deploy the same Milvus, new enough for hybrid search (store.capabilities)."""
    helm = yaml.safe_load((INFRA / "helm" / "milvus-values.yaml").read_text())["image"]["all"]["tag"]
    compose_tag = compose["services"]["milvus"]["image"].rsplit(":", 1)[1]
    assert compose_tag == helm, "upgrade infra/compose and infra/helm together"
    major, minor = (int(n) for n in re.match(r"v?(\d+)\.(\d+)", helm).groups())
    assert (major, minor) >= (2, 5), "BM25 (hybrid search) needs Milvus 2.5"


def test_the_embeddings_server_is_on_a_gpu_at_the_url_docsrag_embeds_with(rendered):
    config = next(d for d in rendered if d["kind"] == "ConfigMap")["data"]
    service = next(d for d in rendered if d["kind"] == "Service" and d["metadata"]["name"] == "embeddings")
    deployment = next(d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"] == "embeddings")
    url = urlparse(config["DOCSRAG_EMBEDDING_BASE_URL"])
    assert config["DOCSRAG_EMBEDDING"] == "openai" and url.path == "/v1"
    assert url.hostname.split(".")[0] == "embeddings" and url.port == service["spec"]["ports"][0]["port"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert config["DOCSRAG_EMBEDDING_MODEL"] in container["args"]
    assert config["DOCSRAG_MULTILINGUAL"] == "off", "the served model is multilingual: no second field on CPU"
