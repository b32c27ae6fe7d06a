"""Every ci values file: ``helm lint --strict``, and each rendered object validated strictly against Kubernetes'
own schemas (kubernetes-validate, 1.34) or, for custom resources, against their CRD's openAPIV3Schema
(prometheus-operator's from tests/data, OME's from the chart). The agent and controller accept every flag the
chart passes; the PrometheusRule passes promtool; the chart's version follows the Python package's.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.chart.conftest import ChartTools
from tests.chart.crdschema import CRDSchemas
from tests.chart.support import CHART, CI_VALUES, KUBE_VERSION, PROM_CRDS, REPO_ROOT, ci_id, render, run

CI_IDS = [ci_id(p) for p in CI_VALUES]
PROM_KINDS = {("monitoring.coreos.com/v1", k) for k in ("PodMonitor", "ServiceMonitor", "PrometheusRule")}
OME_KINDS = {("ome.io/v1beta1", k) for k in ("BaseModel", "ClusterBaseModel")}


@pytest.fixture(scope="module")
def crd_schemas() -> CRDSchemas:
    schemas = CRDSchemas.from_files([*sorted(PROM_CRDS.glob("*.yaml")), *sorted((CHART / "files" / "crds").glob("*"))])
    assert schemas.kinds() >= PROM_KINDS | OME_KINDS, schemas.kinds()
    return schemas


@pytest.fixture(scope="module")
def rendered(chart_tools: ChartTools) -> dict[str, list[dict[str, Any]]]:
    return {ci_id(p): render(chart_tools.helm, p) for p in CI_VALUES}


def _name(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"


def _k8s_errors(obj: dict[str, Any]) -> list[str]:
    try:
        version = kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(str(p) for p in e.path) or '<root>'}: {e.message}"]
    assert version == "1.34", f"validated against Kubernetes {version}, not 1.34"
    return []


def test_there_are_ci_values_files() -> None:
    assert len(CI_VALUES) >= 5, CI_VALUES
    assert "defaults" in CI_IDS


@pytest.mark.parametrize("values", CI_VALUES, ids=CI_IDS)
def test_helm_lint_strict_passes(chart_tools: ChartTools, values: Path) -> None:
    proc = run([chart_tools.helm, "lint", "--strict", "--kube-version", KUBE_VERSION, CHART, "--values", values])
    assert "0 chart(s) failed" in proc.stdout, proc.stdout
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("values", CI_VALUES, ids=CI_IDS)
def test_every_rendered_object_is_valid_for_kubernetes_1_34(
        rendered: dict[str, list[dict[str, Any]]], crd_schemas: CRDSchemas, values: Path) -> None:
    objs = rendered[ci_id(values)]
    assert objs, "nothing rendered"
    problems: dict[str, list[str]] = {}
    for obj in objs:
        key = (obj["apiVersion"], obj["kind"])
        if key in crd_schemas.kinds():
            # kubernetes-validate knows only Kubernetes' own kinds: custom resources against their CRD's schema
            errors = crd_schemas.errors(obj)
        else:
            try:
                errors = _k8s_errors(obj)
            except kubernetes_validate.SchemaNotFoundError:
                errors = [f"no schema for {key}: neither a Kubernetes 1.34 kind nor one of the known CRDs"]
        if errors:
            problems[_name(obj)] = errors
    assert not problems, json.dumps(problems, indent=2)


def test_strict_validation_rejects_a_misspelt_field(chart_tools: ChartTools, crd_schemas: CRDSchemas) -> None:
    (ds,) = [o for o in render(chart_tools.helm) if o["kind"] == "DaemonSet"]
    ds["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert any("imagePullPolicyy" in e for e in _k8s_errors(ds)), _k8s_errors(ds)
    (pm,) = [o for o in render(chart_tools.helm, extra=["--set", "monitoring.podMonitor.enabled=true"])
             if o["kind"] == "PodMonitor"]
    assert crd_schemas.errors(pm) == []
    pm["spec"]["podMetricsEndpoints"][0]["honorLabel"] = True
    assert any("honorLabel" in e for e in crd_schemas.errors(pm)), crd_schemas.errors(pm)


def test_the_ci_files_together_render_every_kind_the_chart_has(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kinds = {o["kind"] for objs in rendered.values() for o in objs}
    assert kinds == {"DaemonSet", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                     "Deployment", "CustomResourceDefinition", "PodMonitor", "ServiceMonitor", "PrometheusRule",
                     "Service", "ConfigMap", "FlowSchema", "PriorityLevelConfiguration"}, kinds


def _containers(objs: list[dict[str, Any]], kind: str) -> Iterator[dict[str, Any]]:
    for obj in objs:
        if obj["kind"] == kind:
            yield from obj["spec"]["template"]["spec"]["containers"]


@pytest.mark.parametrize("values", CI_VALUES, ids=CI_IDS)
def test_the_agent_and_controller_accept_every_flag_the_chart_passes(
        rendered: dict[str, list[dict[str, Any]]], values: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelherd.agent.cli import build_parser, load_settings

    objs = rendered[ci_id(values)]
    checked = 0
    for kind, command in (("DaemonSet", "agent"), ("Deployment", "controller")):
        for container in _containers(objs, kind):
            assert container["command"] == ["modelherd"]
            args = container["args"]
            assert args[0] == command
            for env in container.get("env", []):
                if "value" in env:  # what the pod's environment holds, so Settings reads it like in the pod
                    monkeypatch.setenv(env["name"], env["value"])
            try:
                ns = build_parser().parse_args(args)
            except SystemExit as exc:
                raise AssertionError(f"modelherd rejects the chart's {kind} args {args}") from exc
            settings = load_settings(ns)
            port = container["ports"][0]["containerPort"]
            assert (settings.port if command == "agent" else settings.controller_port) == port
            checked += 1
    assert checked >= 1


def test_the_agent_reads_the_gpu_shape_and_instance_type_map_the_chart_sets(
        chart_tools: ChartTools, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelherd.agent.settings import Settings

    objs = render(chart_tools.helm, CHART / "ci" / "local-values.yaml", extra=["--set", "storage.gpuShape=H200x8"])
    (container,) = _containers(objs, "DaemonSet")
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    for name in [n for n in os.environ if n.startswith(("MODELHERD_", "INSTANCE_TYPE"))]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.gpu_shape == "H200x8"
    assert settings.instance_type_map is not None
    assert json.loads(settings.instance_type_map) == {"BM.GPU.H200.8": "H200x8", "BM.GPU.H100.8": "H100x8",
                                                      "p5.48xlarge": "H100x8"}


TENANCY_ENV = {"MODELHERD_BASEMODEL_PATH_PREFIXES", "MODELHERD_LOCAL_SOURCE_ROOTS",
               "MODELHERD_AMBIENT_CREDENTIAL_NAMESPACES"}


def test_the_agent_reads_the_tenancy_settings_the_chart_sets(
        chart_tools: ChartTools, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelherd.agent.settings import Settings

    path = CHART / "ci" / "tenancy-values.yaml"
    tenancy = yaml.safe_load(path.read_text())["tenancy"]
    (ds,) = [o for o in render(chart_tools.helm, path) if o["kind"] == "DaemonSet"]
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert set(env) >= TENANCY_ENV, env
    for name in [n for n in os.environ if n.startswith("MODELHERD_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.basemodel_path_prefixes == tenancy["basemodelPathPrefixes"] == ["{namespace}"]
    assert settings.local_source_roots == [Path(p) for p in tenancy["localSourceRoots"]]
    assert settings.ambient_credential_namespaces == tenancy["ambientCredentialNamespaces"]

    # every local source root is readable in the pod, read-only, at the same path as on the node
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    for root in tenancy["localSourceRoots"]:
        assert mounts[root].get("readOnly") is True, mounts[root]
        assert volumes[mounts[root]["name"]]["hostPath"] == {"path": root, "type": "Directory"}

    # by default none is set: OME's behaviour
    (default,) = _containers(render(chart_tools.helm), "DaemonSet")
    assert not TENANCY_ENV & {e["name"] for e in default["env"]}


def test_the_read_only_daemonset_differs_from_the_main_one_only_where_it_must(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    """storage.readOnlyNodes (ci/read-only-values.yaml): the second DaemonSet is the first but for its name, its
    component, `In` for `NotIn` on the node label in each required term, and the read-only models root."""
    path = CHART / "ci" / "read-only-values.yaml"
    ro = yaml.safe_load(path.read_text())["storage"]["readOnlyNodes"]
    main, follower = [o for o in rendered[ci_id(path)] if o["kind"] == "DaemonSet"]
    assert (main["metadata"]["name"], follower["metadata"]["name"]) == ("mh-modelherd", "mh-modelherd-read-only")
    label = {"key": ro["nodeLabel"], "values": [ro["value"]]}

    def terms(ds: dict[str, Any]) -> list[dict[str, Any]]:
        spec = ds["spec"]["template"]["spec"]
        return spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms(main) and all({**label, "operator": "NotIn"} in t["matchExpressions"] for t in terms(main))
    assert terms(follower) and all({**label, "operator": "In"} in t["matchExpressions"] for t in terms(follower))

    (pod_monitor,) = [o for o in rendered[ci_id(path)] if o["kind"] == "PodMonitor"]
    selector = pod_monitor["spec"]["selector"]["matchLabels"]
    for ds in (main, follower):  # both scraped: the PodMonitor's selector matches the pods of both
        assert selector.items() <= ds["spec"]["template"]["metadata"]["labels"].items(), ds["metadata"]["name"]

    expected = copy.deepcopy(main)
    expected["metadata"]["name"] = "mh-modelherd-read-only"
    for labels in (expected["metadata"]["labels"], expected["spec"]["selector"]["matchLabels"],
                   expected["spec"]["template"]["metadata"]["labels"]):
        assert labels["app.kubernetes.io/component"] == "agent"
        labels["app.kubernetes.io/component"] = "agent-read-only"
    for term in terms(expected):
        term["matchExpressions"] = [{**e, "operator": "In"} if e == {**label, "operator": "NotIn"} else e
                                    for e in term["matchExpressions"]]
    models = expected["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]
    assert models["name"] == "models" and "readOnly" not in models
    models["readOnly"] = True
    assert follower == expected


@pytest.mark.parametrize("values", [p for p in CI_VALUES if "prometheusRule" in p.read_text()],
                         ids=lambda p: ci_id(p))
def test_the_rendered_prometheus_rule_passes_promtool(
        rendered: dict[str, list[dict[str, Any]]], values: Path, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing (scripts/test.sh installs Debian's prometheus package)")
    (rule,) = [o for o in rendered[ci_id(values)] if o["kind"] == "PrometheusRule"]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    proc = run([promtool, "check", "rules", path])
    assert "SUCCESS" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_chart_version_and_app_version_follow_the_python_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["version"] == version
    assert str(chart["appVersion"]) == version
