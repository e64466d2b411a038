"""The deployment surface: the Dockerfile, deploy/ and docs/operations.md, read as data.

No Docker engine or cluster runs here, so these files cannot be exercised end to end. What can be
checked is that the fields the security posture depends on say what the docs claim: a numeric
non-root user that matches the image, a read-only root filesystem, no privilege escalation, no
capabilities, seccomp, probes on routes the app really has, one SQLite replica, a PDB and a
port-limited NetworkPolicy for PostgreSQL, no real secret committed, and no setting name that the
service would silently ignore.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service import alerting
from service.app import create_app
from service.settings import SPECS, Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "base"
OVERLAYS = {name: DEPLOY / "overlays" / name for name in ("sqlite", "postgres")}
SETTING_NAMES = {spec.name for spec in SPECS.values()}
SECRET_TEMPLATES = [BASE / "secret.template.yaml", OVERLAYS["postgres"] / "database-secret.template.yaml"]
SUPERMEMORY_KEY = re.compile(r"sm_[A-Za-z0-9_-]{20,}")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def kustomization(directory: Path) -> dict:
    return load(directory / "kustomization.yaml")


def dockerfile_final_stage() -> list[str]:
    """Instructions of the last stage, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    joined = re.sub(r"\\\n", " ", text)
    lines = [
        line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    last_from = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    return lines[last_from:]


def dockerfile_uid() -> int:
    users = [line.split(None, 1)[1] for line in dockerfile_final_stage() if line.upper().startswith("USER ")]
    assert len(users) == 1, users
    user = users[0].split(":")[0]
    assert user.isdigit(), f"USER must be numeric so runAsNonRoot can verify it, got {users[0]!r}"
    return int(user)


def app_paths() -> set[str]:
    settings = Settings.load(
        {
            "LEAK_RESPONDER_SUPERMEMORY_API_URL": "http://127.0.0.1:1",
            "LEAK_RESPONDER_SUPERMEMORY_ADMIN_TOKEN": "t",
        },
        env_file=None,
    )
    # The runtime is only used by the lifespan, which never runs here: no store is opened.
    app = create_app(settings, runtime=object())  # type: ignore[arg-type]
    return {route.path for route in app.routes}


def pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    found = []
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            found.append((f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]))
        elif doc["kind"] == "CronJob":
            found.append(
                (f"CronJob/{doc['metadata']['name']}", doc["spec"]["jobTemplate"]["spec"]["template"])
            )
    return found


def source_documents() -> list[dict]:
    """Every resource file under deploy/base and deploy/overlays, as written (patches aside)."""
    docs = []
    for path in sorted((DEPLOY / "base").glob("*.yaml")) + sorted((DEPLOY / "overlays").rglob("*.yaml")):
        if path.name != "kustomization.yaml" and not path.name.endswith("-patch.yaml"):
            docs.extend(d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d)
    return docs


def base_deployment() -> dict:
    return load(BASE / "deployment.yaml")


def overlay_patch(name: str) -> dict:
    return load(OVERLAYS[name] / "deployment-patch.yaml")


# --- the image -------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_on_slim_with_nothing_but_the_venv():
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS builder$", text, re.M)
    final = dockerfile_final_stage()
    assert final[0] == "FROM ${PYTHON_IMAGE}"
    assert "COPY --from=builder /opt/venv /opt/venv" in final
    # Only the venv crosses over: no source tree, no build tools installed in the final stage.
    assert not [line for line in final if line.startswith("COPY") and "--from=builder" not in line]
    assert not [line for line in final if re.search(r"apt-get|apk |pip install|gcc|build-essential", line)]


def test_dockerfile_runs_as_a_numeric_non_root_user():
    assert dockerfile_uid() == 10001


def test_dockerfile_healthcheck_probes_livez_with_python():
    checks = [line for line in dockerfile_final_stage() if line.startswith("HEALTHCHECK")]
    assert len(checks) == 1
    assert "/livez" in checks[0]
    assert '"python"' in checks[0]
    assert "curl" not in checks[0]
    assert "/livez" in app_paths()


def test_dockerfile_serves_on_8000_with_sqlite_on_the_data_volume():
    final = dockerfile_final_stage()
    assert "EXPOSE 8000" in final
    assert 'ENTRYPOINT ["leak-responder"]' in final
    assert 'CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]' in final
    assert 'VOLUME ["/data"]' in final
    env = " ".join(line for line in final if line.startswith("ENV "))
    assert "LEAK_RESPONDER_DATABASE_URL=sqlite:////data/leak-responder.db" in env
    for name in re.findall(r"\b(LEAK_RESPONDER_[A-Z_]+|SENTRY_[A-Z_]+)=", env):
        assert name in SETTING_NAMES


def test_dockerignore_is_an_allow_list_that_keeps_secrets_out():
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    assert {line[1:] for line in lines if line.startswith("!")} == {"pyproject.toml", "README.md", "service/"}


# --- pod security --------------------------------------------------------------------------


def assert_restricted(where: str, template: dict, uid: int) -> None:
    spec = template["spec"]
    pod = spec.get("securityContext", {})
    assert spec.get("automountServiceAccountToken") is False, where
    assert pod.get("runAsNonRoot") is True, where
    assert pod.get("runAsUser") == uid, where
    assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
    tmp_volumes = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
    for container in spec["containers"] + spec.get("initContainers", []):
        name = f"{where} container {container['name']}"
        sc = container.get("securityContext", {})
        assert sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, name
        assert sc.get("runAsUser", pod.get("runAsUser")) == uid, name
        assert sc.get("readOnlyRootFilesystem") is True, name
        assert sc.get("allowPrivilegeEscalation") is False, name
        assert sc.get("privileged", False) is False, name
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
        assert not sc.get("capabilities", {}).get("add"), name
        seccomp = sc.get("seccompProfile", pod.get("seccompProfile", {}))
        assert seccomp.get("type") == "RuntimeDefault", name
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert mounts.get("/tmp") in tmp_volumes, f"{name}: /tmp must be a writable emptyDir"
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{name}: {kind}"


def test_every_pod_template_meets_the_restricted_standard_and_matches_the_image_user():
    templates = pod_templates(source_documents())
    assert {where for where, _ in templates} == {
        "Deployment/leak-responder",
        "CronJob/leak-responder-migrate",
    }
    for where, template in templates:
        assert_restricted(where, template, dockerfile_uid())


def test_namespace_enforces_restricted_and_the_service_account_has_no_token():
    namespace = load(BASE / "namespace.yaml")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    account = load(BASE / "serviceaccount.yaml")
    assert account["automountServiceAccountToken"] is False
    spec = base_deployment()["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    resources = kustomization(BASE)["resources"]
    assert {"namespace.yaml", "serviceaccount.yaml", "deployment.yaml", "service.yaml"} <= set(resources)


def test_probes_hit_routes_the_app_has_and_shutdown_has_time():
    spec = base_deployment()["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"
    paths = app_paths()
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in paths
        assert container[probe]["httpGet"]["port"] == "http"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8000}
    assert container["args"] == ["serve", "--host", "0.0.0.0", "--port", "8000"]
    assert spec["terminationGracePeriodSeconds"] >= 30
    assert spec["enableServiceLinks"] is False


def test_service_selects_the_deployment_pods_only():
    service = load(BASE / "service.yaml")
    pods = base_deployment()["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pods.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    (cronjob,) = [d for d in source_documents() if d["kind"] == "CronJob"]
    migrate_pods = cronjob["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= migrate_pods.items()


def test_the_migration_job_gets_its_own_database_url_and_no_other_secret():
    (cronjob,) = [d for d in source_documents() if d["kind"] == "CronJob"]
    [container] = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert "envFrom" not in container
    sources = {
        e["name"]: e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") for e in container["env"]
    }
    assert sources == {
        "LEAK_RESPONDER_LOG_FORMAT": None,
        "LEAK_RESPONDER_DATABASE_URL": "leak-responder-migrate-database",
    }
    compose = load(DEPLOY / "docker-compose.yml")
    assert set(compose["services"]["migrate"]["environment"]) == {
        "LEAK_RESPONDER_DATABASE_URL",
        "LEAK_RESPONDER_LOG_FORMAT",
    }


# --- the overlays --------------------------------------------------------------------------


def test_sqlite_overlay_is_one_replica_recreated_on_a_volume():
    assert set(kustomization(OVERLAYS["sqlite"])["resources"]) == {"../../base", "pvc.yaml"}
    spec = overlay_patch("sqlite")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pvc = load(OVERLAYS["sqlite"] / "pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    pod = spec["template"]["spec"]
    (volume,) = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    (container,) = pod["containers"]
    assert {"name": volume["name"], "mountPath": "/data"} in container["volumeMounts"]
    (generator,) = kustomization(OVERLAYS["sqlite"])["configMapGenerator"]
    assert generator["behavior"] == "merge"
    assert "LEAK_RESPONDER_DATABASE_URL=sqlite:////data/leak-responder.db" in generator["literals"]


def test_postgres_overlay_is_several_replicas_rolling_with_the_url_from_a_secret():
    spec = overlay_patch("postgres")["spec"]
    assert spec["replicas"] >= 3
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (container,) = spec["template"]["spec"]["containers"]
    (url,) = [e for e in container["env"] if e["name"] == "LEAK_RESPONDER_DATABASE_URL"]
    assert "value" not in url
    ref = url["valueFrom"]["secretKeyRef"]
    assert ref.get("optional", False) is False
    template = load(OVERLAYS["postgres"] / "database-secret.template.yaml")
    assert ref["name"] == template["metadata"]["name"]
    assert ref["key"] in template["stringData"]


def test_postgres_overlay_has_a_pod_disruption_budget_that_keeps_a_majority():
    pdb = load(OVERLAYS["postgres"] / "poddisruptionbudget.yaml")
    replicas = overlay_patch("postgres")["spec"]["replicas"]
    spec = pdb["spec"]
    assert spec.get("minAvailable", 0) >= 2 or spec.get("maxUnavailable") == 1
    assert spec.get("minAvailable", 0) < replicas, "a PDB that allows no disruption blocks node drains"
    pods = base_deployment()["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pods.items()
    assert "poddisruptionbudget.yaml" in kustomization(OVERLAYS["postgres"])["resources"]


def test_postgres_network_policy_allows_only_the_needed_ports():
    policy = load(OVERLAYS["postgres"] / "networkpolicy.yaml")
    spec = policy["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    selector = spec["podSelector"]["matchLabels"]
    pods = base_deployment()["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pods.items()
    (cronjob,) = [d for d in source_documents() if d["kind"] == "CronJob"]
    assert (
        selector.items() <= cronjob["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"].items()
    )

    def ports(rules: list[dict]) -> set[tuple[str, int]]:
        found = set()
        for rule in rules:
            # A rule without ports allows every port: that would undo the policy.
            assert rule.get("ports"), rule
            found |= {(p.get("protocol", "TCP"), p["port"]) for p in rule["ports"]}
        return found

    assert ports(spec["ingress"]) == {("TCP", 8000)}
    assert ports(spec["egress"]) == {
        ("UDP", 53),
        ("TCP", 53),
        ("TCP", 443),
        ("TCP", 587),
        ("TCP", 465),
        ("TCP", 5432),
    }
    assert "networkpolicy.yaml" in kustomization(OVERLAYS["postgres"])["resources"]


# --- secrets and setting names -------------------------------------------------------------


def test_secret_templates_hold_placeholders_only_and_are_never_applied():
    for path in SECRET_TEMPLATES:
        secret = load(path)
        assert secret["kind"] == "Secret"
        assert "data" not in secret, f"{path.name}: base64 data would hide what is committed"
        for key, value in secret["stringData"].items():
            assert value == "" or "REPLACE_ME" in value, f"{path.name}: {key} looks like a real value"
            assert not SUPERMEMORY_KEY.search(value), f"{path.name}: {key}"
    for directory in (BASE, *OVERLAYS.values()):
        listed = kustomization(directory).get("resources", [])
        assert not [r for r in listed if "secret" in r], f"{directory}: a secret template is applied"
        assert "secretGenerator" not in kustomization(directory)


def env_names_in_manifests() -> set[str]:
    names = set()
    config = (BASE / "config.env").read_text(encoding="utf-8")
    names |= {line.split("=", 1)[0] for line in config.splitlines() if line and not line.startswith("#")}
    for directory in (BASE, *OVERLAYS.values()):
        for generator in kustomization(directory).get("configMapGenerator", []):
            names |= {literal.split("=", 1)[0] for literal in generator.get("literals", [])}
    names |= set(load(BASE / "secret.template.yaml")["stringData"])
    for _, template in pod_templates(source_documents()):
        for container in template["spec"]["containers"]:
            names |= {e["name"] for e in container.get("env", [])}
    return names


def test_every_variable_in_the_manifests_is_a_setting():
    names = env_names_in_manifests()
    assert "LEAK_RESPONDER_SUPERMEMORY_ADMIN_TOKEN" in names
    assert names <= SETTING_NAMES, names - SETTING_NAMES


def test_config_map_holds_no_secret_setting():
    secret_names = {spec.name for spec in SPECS.values() if spec.secret}
    config = (BASE / "config.env").read_text(encoding="utf-8")
    assert not {line.split("=", 1)[0] for line in config.splitlines() if line} & secret_names


# --- compose -------------------------------------------------------------------------------


def test_compose_runs_postgres_then_migrate_then_the_hardened_service():
    compose = load(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    postgres = services["postgres"]
    assert postgres["image"] == "postgres:16"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert "ports" not in postgres, "the database stays on the compose network"
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    app = services["leak-responder"]
    assert app["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "/readyz" in " ".join(app["healthcheck"]["test"])
    assert app["environment"]["LEAK_RESPONDER_DATABASE_URL"].startswith("postgresql://")
    assert app["environment"]["LEAK_RESPONDER_DATA_KEY"].startswith("${LEAK_RESPONDER_DATA_KEY:?")
    uid = dockerfile_uid()
    for name in ("migrate", "leak-responder", "sandbox"):
        service = services[name]
        assert service["user"] == f"{uid}:{uid}", name
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert all(p.startswith("127.0.0.1:") for p in service.get("ports", [])), name
        assert set(service.get("environment", {})) <= SETTING_NAMES, name


# --- docs ----------------------------------------------------------------------------------


def test_operations_doc_lists_every_setting_with_its_default():
    rows = {}
    for line in (ROOT / "docs" / "operations.md").read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| `([A-Z_]+)`", line)
        if match:
            rows[match.group(1)] = line
    assert set(rows) >= SETTING_NAMES, SETTING_NAMES - set(rows)
    for spec in SPECS.values():
        row = rows[spec.name]
        assert ("🔒" in row) is spec.secret or spec.name == "LEAK_RESPONDER_DATABASE_URL", row
        if spec.default:
            assert f"`{spec.default}`" in row, row


def test_sentry_rules_cover_every_page_code_and_the_cron_monitor():
    rules = (DEPLOY / "sentry-alert-rules.md").read_text(encoding="utf-8")
    for code in alerting.LEVELS:
        assert f"`{code}`" in rules, code
    slug = getattr(alerting, "MONITOR_SLUG", None)
    if slug is not None:
        assert f"`{slug}`" in rules


# --- rendered with kustomize, where kubectl is installed ----------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its kustomize) is not installed")
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_rendered_overlay_keeps_the_security_settings(overlay):
    out = subprocess.run(
        ["kubectl", "kustomize", str(OVERLAYS[overlay])],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "leak-responder", doc["metadata"]["name"]
    assert not [d for d in docs if d["kind"] == "Secret"]
    templates = pod_templates(docs)
    for where, template in templates:
        assert_restricted(where, template, dockerfile_uid())
        for container in template["spec"]["containers"]:
            assert container["image"] != "leak-responder", f"{where}: the images transform missed it"
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    spec = deployment["spec"]
    if overlay == "sqlite":
        assert spec["replicas"] == 1
        assert spec["strategy"] == {"type": "Recreate"}
        claims = [v for v in spec["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
        assert len(claims) == 1
    else:
        assert spec["replicas"] >= 3
        assert spec["strategy"]["type"] == "RollingUpdate"
        assert {d["kind"] for d in docs} >= {"PodDisruptionBudget", "NetworkPolicy", "CronJob"}
