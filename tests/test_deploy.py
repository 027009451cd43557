"""deploy/: the images, compose, Kubernetes (kustomize base + overlays), the gateway, the Grafana
dashboard and the sizing script, checked without Docker or a cluster.

- Every YAML file parses; every Kubernetes object has a known kind and apiVersion.
- The overlays are rendered here (resources, strategic-merge patches, images, namespace,
  ConfigMap generators), and by `kubectl kustomize` where it exists: both renders must agree.
- The server's workload: probes on /health, a grace period longer than preStop + the
  --shutdown-timeout it passes, container args that `loraplex serve` accepts (its real parser),
  resources on every container, a GPU in the gpu overlay only, every volume, ConfigMap, Secret
  and claim it names exists; the Service, ServiceMonitor, HPA and InferencePool point at it.
- Every metric name in the dashboard, the HPA, the prometheus-adapter rule and the endpoint
  picker's config is one a live server exposes (read from its /metrics), with the labels used.
- The Dockerfiles and compose file: HEALTHCHECK, a non-root USER, the volumes, no model fetch,
  the README's install order, an entrypoint `loraplex serve` accepts.
- The tenants init container's script renders a file the server's tenants parser accepts.
- deploy/sizing.py matches a real engine's pages, and docs/deploy.md shows its output.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from server_fixtures import LiveServer, engine_kwargs, tiny_model

from loraplex.server.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
OVERLAYS = ("cpu", "gpu")
NAMESPACE = "loraplex"
KNOWN_KINDS = {
    ("v1", "Service"), ("v1", "ConfigMap"), ("v1", "Secret"), ("v1", "ServiceAccount"),
    ("v1", "PersistentVolumeClaim"), ("apps/v1", "StatefulSet"), ("apps/v1", "Deployment"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"), ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("inference.networking.k8s.io/v1", "InferencePool"),
    ("llm-d.ai/v1alpha2", "InferenceObjective"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
}  # fmt: skip
# Families with no series in the test server's /metrics (no fine-tuning job in its database):
# their labels cannot be checked there.
NO_SAMPLES = {"loraplex_finetune_jobs"}
# Labels Prometheus adds to every scraped series (never in /metrics itself).
TARGET_LABELS = {"instance", "job", "namespace", "pod", "service", "container", "endpoint"}


# -- kustomize, the parts we use ----------------------------------------------------------------

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "patches", "images",
                      "configMapGenerator", "generatorOptions"}  # fmt: skip
# Strategic merge: lists merged by these keys (the Kubernetes API's patchMergeKey); others replace.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
              "volumeMounts": "mountPath", "tolerations": None}  # fmt: skip


def _load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _merge(base: dict, patch: dict) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        elif isinstance(value, list) and MERGE_KEYS.get(key) and isinstance(base.get(key), list):
            mk, new = MERGE_KEYS[key], []
            for item in value:
                same = [b for b in base[key] if b.get(mk) == item.get(mk)]
                if same:
                    _merge(same[0], item)
                else:
                    new.append(copy.deepcopy(item))
            base[key][:0] = new  # kustomize puts a patch's new items first
        else:
            base[key] = copy.deepcopy(value)


def _pod_specs(obj: dict) -> list[dict]:
    spec = obj.get("spec", {}).get("template", {}).get("spec")
    return [spec] if spec else []


def _containers(obj: dict, init: bool = True) -> list[dict]:
    out = []
    for spec in _pod_specs(obj):
        out += spec.get("containers", []) + (spec.get("initContainers", []) if init else [])
    return out


def render(directory: Path) -> list[dict]:
    """What `kustomize build directory` gives, for the fields our kustomizations use."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(k) <= KUSTOMIZATION_KEYS, f"{directory}: unsupported {set(k) - KUSTOMIZATION_KEYS}"
    objs: list[dict] = []
    for res in k.get("resources", []):
        path = directory / res
        objs += render(path) if path.is_dir() else _load(path)
    generators = k.get("configMapGenerator", [])
    if generators:
        assert k.get("generatorOptions", {}).get("disableNameSuffixHash") is True
    for gen in generators:
        data = {}
        for item in gen["files"]:
            key, _, src = item.rpartition("=")
            data[key or Path(src).name] = (directory / src).read_text()
        objs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]},
                     "data": data})  # fmt: skip
    for patch in k.get("patches", []):
        assert set(patch) == {"path"}, patch
        for p in _load(directory / patch["path"]):
            (target,) = [o for o in objs if _key(o) == _key(p)]
            _merge(target, p)
    for img in k.get("images", []):
        for c in (c for o in objs for c in _containers(o)):
            name, _, tag = c["image"].partition(":")
            if name == img["name"]:
                c["image"] = f"{img.get('newName', name)}:{img.get('newTag', tag)}".rstrip(":")
    if "namespace" in k:
        for o in objs:
            o["metadata"]["namespace"] = k["namespace"]
            for s in o.get("subjects", []):
                if s.get("kind") == "ServiceAccount":
                    s["namespace"] = k["namespace"]
    return objs


def _key(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _by_key(objs: list[dict]) -> dict[tuple[str, str], dict]:
    out = {_key(o): o for o in objs}
    assert len(out) == len(objs), "two objects with the same kind and name"
    return out


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[tuple[str, str], dict]]:
    dirs = {o: K8S / "overlays" / o for o in OVERLAYS} | {"gateway": K8S / "gateway"}
    return {name: _by_key(render(d)) for name, d in dirs.items()}


def _server(objs: dict) -> dict:
    return objs[("StatefulSet", "loraplex")]


def _main_container(objs: dict) -> dict:
    (c,) = [c for c in _containers(_server(objs), init=False) if c["name"] == "loraplex"]
    return c


def _serve_args(argv: list[str]):
    """Parse `loraplex serve ARGS` with the real parser; fail with argparse's message."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return build_parser().parse_args(["serve", *argv])
        except SystemExit:
            pytest.fail(f"`loraplex serve {shlex.join(argv)}` is refused: {err.getvalue()}")


# -- the metrics a live server exposes ---------------------------------------------------------


@pytest.fixture(scope="module")
def exposed(tmp_path_factory) -> dict[str, set[str]]:
    """{sample name: label names} from a live server's /metrics, after a completion and a
    fine-tuning step were counted (so the per-tenant and per-job series exist)."""
    from prometheus_client.parser import text_string_to_metric_families

    from loraplex.engine.config import EngineConfig
    from loraplex.engine.engine import Engine
    from loraplex.server.app import create_app
    from loraplex.server.config import ServerConfig

    m = tiny_model()
    engine = Engine(EngineConfig(model=m["model"], **engine_kwargs()), {"a": m["adapters"]["a"]})
    finetune_dir = str(tmp_path_factory.mktemp("ft"))
    app = create_app(engine, ServerConfig(model_id="tiny", finetune_dir=finetune_dir))
    srv = LiveServer(app)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as h:
            body = {"model": "a", "prompt": "hello", "max_tokens": 2, "temperature": 0}
            assert h.post("/v1/completions", json=body).status_code == 200
            app.state.ctx.metrics.finetune_step("default", "ftjob-x", 8, 0.01, 1.5)
            text = h.get("/metrics").text
    finally:
        srv.stop()
    out: dict[str, set[str]] = {}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith("loraplex_"):
            continue
        for suffix in suffixes.get(fam.type, ("",)):
            out.setdefault(fam.name + suffix, set())
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bloraplex_[a-z0-9_]+", expr))


def _check_promql(expr: str, exposed: dict[str, set[str]]) -> None:
    names = _metric_names(expr)
    assert names, expr
    unknown = names - set(exposed)
    assert not unknown, f"{expr}: not exposed by the server: {sorted(unknown)}"
    if names & NO_SAMPLES:
        return  # no series to read labels from
    labels = set().union(*(exposed[n] for n in names)) | TARGET_LABELS
    used = set()
    for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        used |= {x.strip() for x in group.split(",") if x.strip() and "<<" not in x}
    for sel in re.findall(r"\{([^}]*)\}", expr):
        used |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", sel))
    assert used <= labels, f"{expr}: labels {sorted(used - labels)} not on {sorted(names)}"


# -- YAML and Kubernetes objects ----------------------------------------------------------------


def test_every_yaml_file_parses():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) > 15
    for f in files:
        assert _load(f), f


def test_objects_have_known_kinds_and_the_overlay_namespace(rendered):
    for name, objs in rendered.items():
        assert objs, name
        for (kind, obj_name), o in objs.items():
            assert (o["apiVersion"], kind) in KNOWN_KINDS, (name, o["apiVersion"], kind)
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", obj_name), obj_name
            assert o["metadata"].get("namespace") == NAMESPACE, (name, kind, obj_name)
            if kind not in ("ConfigMap", "Secret", "ServiceAccount", "Role", "RoleBinding"):
                assert "spec" in o, (name, kind)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its kustomize) not here")
@pytest.mark.parametrize("target", ["overlays/cpu", "overlays/gpu", "gateway"])
def test_render_agrees_with_kubectl_kustomize(target):
    proc = subprocess.run(["kubectl", "kustomize", str(K8S / target)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    theirs = _by_key([d for d in yaml.safe_load_all(proc.stdout) if d])
    assert theirs == _by_key(render(K8S / target))


# ids not "gpu": conftest.py skips tests with that keyword when there is no CUDA device
@pytest.mark.parametrize("overlay", OVERLAYS, ids=[f"{o}-overlay" for o in OVERLAYS])
def test_server_workload(rendered, overlay):
    objs = rendered[overlay]
    sts = _server(objs)
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    assert "replicas" not in spec, "the HPA owns the replica count"
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    c = _main_container(objs)
    assert c["command"] == ["loraplex", "serve"]
    args = _serve_args(c["args"])
    assert args.host == "0.0.0.0" and args.finetune_dir == "/finetune"
    assert args.adapter_root == "/adapters" and args.tenants.startswith("/run/loraplex/")
    (port,) = c["ports"]
    assert (port["name"], port["containerPort"]) == ("http", args.port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ("http", args.port), probe
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > float(pre_stop[1]) + args.shutdown_timeout + 5, (grace, args.shutdown_timeout)
    for cont in _containers(sts):
        res = cont["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"], cont["name"]
        assert cont["image"] == f"loraplex:0.1.0-{'cuda' if overlay == 'gpu' else 'cpu'}"
        assert cont["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"]
    # volumes and what they name
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
    for cont in _containers(sts):
        for mount in cont.get("volumeMounts", []):
            assert mount["name"] in volumes or mount["name"] in claims, mount
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/models", "/adapters", "/finetune", str(Path(args.tenants).parent)} <= mounts
    for v in volumes.values():
        if "configMap" in v:
            assert ("ConfigMap", v["configMap"]["name"]) in objs, v
        if "secret" in v:
            assert ("Secret", v["secret"]["secretName"]) in objs, v
        if "persistentVolumeClaim" in v:
            assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in objs, v
    for env in c.get("env", []):
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["key"] in objs[("Secret", ref["name"])]["stringData"], ref
    # the Services, the ServiceMonitor and the HPA point at it
    pod_labels = spec["template"]["metadata"]["labels"]
    svc = objs[("Service", "loraplex")]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert objs[("Service", spec["serviceName"])]["spec"]["clusterIP"] == "None"
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert svc_ports["http"]["targetPort"] in ("http", args.port)
    sm = objs[("ServiceMonitor", "loraplex")]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    others = [s for k, s in objs.items() if k[0] == "Service" and s is not svc]
    assert not any(
        sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        for s in others
    ), "the ServiceMonitor would scrape the replicas twice"
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in svc_ports and ep["path"] == "/metrics"
    hpa = objs[("HorizontalPodAutoscaler", "loraplex")]["spec"]
    ref = hpa["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "StatefulSet", "loraplex")
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    ft = objs[("Service", "loraplex-finetune")]["spec"]
    assert ft["selector"]["statefulset.kubernetes.io/pod-name"] == "loraplex-0"


def test_gpu_is_requested_by_the_gpu_overlay_only(rendered):
    def gpus(objs):
        return [
            (c["name"], part, c["resources"][part].get("nvidia.com/gpu"))
            for o in objs.values()
            for c in _containers(o)
            for part in ("requests", "limits")
            if "nvidia.com/gpu" in c.get("resources", {}).get(part, {})
        ]

    assert gpus(rendered["gpu"]) == [("loraplex", "requests", 1), ("loraplex", "limits", 1)]
    assert gpus(rendered["cpu"]) == gpus(rendered["gateway"]) == []
    assert gpus(_by_key(render(K8S / "base"))) == []
    gpu_args = _serve_args(_main_container(rendered["gpu"])["args"])
    cpu_args = _serve_args(_main_container(rendered["cpu"])["args"])
    assert (gpu_args.device, gpu_args.dtype) == ("cuda", "bfloat16") and gpu_args.model
    assert cpu_args.device == "cpu" and cpu_args.pool_bytes


def test_hpa_metric_and_prometheus_adapter_rule(rendered, exposed):
    hpa = rendered["cpu"][("HorizontalPodAutoscaler", "loraplex")]["spec"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    name = metric["pods"]["metric"]["name"]
    assert name == "loraplex_num_requests_waiting" and name in exposed
    (rule,) = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"][
        "custom"
    ]
    assert rule["name"]["as"] == name and re.fullmatch(rule["name"]["matches"], name)
    _check_promql(rule["seriesQuery"], exposed)
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_tenants_render_to_a_file_the_server_accepts(rendered, tmp_path):
    import importlib.util

    from loraplex.server.tenants import Tenants

    objs = rendered["cpu"]
    cm = objs[("ConfigMap", "loraplex-tenants")]["data"]
    keys = objs[("Secret", "loraplex-tenant-keys")]["stringData"]
    (tmp_path / "tenants.toml").write_text(cm["tenants.toml"])
    (tmp_path / "keys").mkdir()
    for tenant, value in keys.items():
        (tmp_path / "keys" / tenant).write_text(value)
    init = _server(objs)["spec"]["template"]["spec"]["initContainers"][0]
    out = Path(init["command"][-1])
    assert init["command"][1] == "/etc/loraplex/tenants/render_tenants.py"
    assert str(out) == _serve_args(_main_container(objs)["args"]).tenants
    spec = importlib.util.spec_from_file_location("render_tenants", K8S / "base/render_tenants.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = [str(tmp_path / "tenants.toml"), str(tmp_path / "keys"), str(tmp_path / "t.toml")]
    assert mod.main(argv) == 0
    assert (tmp_path / "t.toml").stat().st_mode & 0o077 == 0
    api_key = objs[("Secret", "loraplex-api-key")]["stringData"]["LORAPLEX_API_KEY"]
    tenants = Tenants.from_options(str(tmp_path / "t.toml"), api_key)
    assert set(tenants.by_name) == {"acme", "globex", "ops", "admin"}
    for tenant, value in keys.items():
        for key in value.split():
            assert tenants.authenticate(f"Bearer {key}").name == tenant
    assert tenants.by_name["ops"].admin and not tenants.by_name["acme"].admin
    # keys in the ConfigMap's file, or a tenant without keys, are refused
    (tmp_path / "bad.toml").write_text('[[tenants]]\nname = "x"\napi_keys = ["k"]\n')
    assert mod.main([str(tmp_path / "bad.toml"), str(tmp_path / "keys"), str(tmp_path / "o")]) == 1
    (tmp_path / "bad.toml").write_text('[[tenants]]\nname = "nokeys"\n')
    assert mod.main([str(tmp_path / "bad.toml"), str(tmp_path / "keys"), str(tmp_path / "o")]) == 1
    assert mod.toml_str('a"b\\c\td\u00e9') == '"a\\"b\\\\c\\U00000009d\u00e9"'


# -- the gateway --------------------------------------------------------------------------------


def test_gateway_pool_picker_and_routes(rendered, exposed):
    gw = rendered["gateway"]
    pool = gw[("InferencePool", "loraplex")]["spec"]
    for overlay in OVERLAYS:
        sts = _server(rendered[overlay])["spec"]["template"]
        assert pool["selector"]["matchLabels"].items() <= sts["metadata"]["labels"].items()
        port = _main_container(rendered[overlay])["ports"][0]["containerPort"]
        assert pool["targetPorts"] == [{"number": port}]
    ref = pool["endpointPickerRef"]
    epp_svc = gw[("Service", ref["name"])]["spec"]
    assert ref["port"]["number"] in {p["port"] for p in epp_svc["ports"]}
    assert ref["failureMode"] in ("FailOpen", "FailClose")
    epp = gw[("Deployment", "loraplex-epp")]
    assert epp_svc["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    (c,) = _containers(epp)
    assert c["image"].endswith(":v0.10.0") and "resources" in c
    flags = dict(a.removeprefix("--").split("=", 1) for a in c["args"])
    assert flags["pool-name"] == "loraplex" and flags["pool-group"] == "inference.networking.k8s.io"
    deprecated = {
        "total-queued-requests-metric", "total-running-requests-metric",
        "kv-cache-usage-percentage-metric", "lora-info-metric", "cache-info-metric",
    }  # fmt: skip
    assert not deprecated & set(flags), "llm-d-router v0.10.0 refuses these: use engineConfigs"
    assert int(flags["grpc-port"]) == ref["port"]["number"]
    config_path = Path(flags["config-file"])
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    (vol,) = [v for v in epp["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    cfg_text = gw[("ConfigMap", vol["configMap"]["name"])]["data"][config_path.name]
    cfg = yaml.safe_load(cfg_text)
    assert (cfg["apiVersion"], cfg["kind"]) == ("llm-d.ai/v1alpha1", "EndpointPickerConfig")
    plugins = {p.get("name", p["type"]): p for p in cfg["plugins"]}
    refs = [p["pluginRef"] for prof in cfg["schedulingProfiles"] for p in prof["plugins"]]
    refs += [s["pluginRef"] for s in cfg["dataLayer"]["sources"]]
    refs += [e["pluginRef"] for s in cfg["dataLayer"]["sources"] for e in s["extractors"]]
    assert set(refs) <= set(plugins) and "lora-affinity-scorer" in refs
    extractor = plugins["core-metrics-extractor"]["parameters"]
    (engine_cfg,) = extractor["engineConfigs"]
    assert engine_cfg["name"] == extractor["defaultEngine"] == "loraplex"
    for overlay in OVERLAYS:
        labels = _server(rendered[overlay])["spec"]["template"]["metadata"]["labels"]
        assert labels[extractor["engineLabelKey"]] == engine_cfg["name"]
    specs = {k: v for k, v in engine_cfg.items() if k.endswith("Spec")}
    assert specs == {
        "queuedRequestsSpec": "loraplex_num_requests_waiting",
        "runningRequestsSpec": "loraplex_num_requests_running",
        "kvUsageSpec": "loraplex_kv_cache_usage_perc",
        "loraSpec": "loraplex_lora_requests_info",
    }
    for spec in specs.values():
        _check_promql(spec, exposed)
    assert exposed["loraplex_lora_requests_info"] == {
        "max_lora", "running_lora_adapters", "waiting_lora_adapters"}  # fmt: skip
    source = plugins["metrics-data-source"]["parameters"]
    assert source["path"] == "/metrics" and source["scheme"] == "http"
    for obj in (o for k, o in gw.items() if k[0] == "InferenceObjective"):
        assert obj["spec"]["poolRef"]["name"] == "loraplex" and "priority" in obj["spec"]
    route = gw[("HTTPRoute", "loraplex")]["spec"]
    for rule in route["rules"]:
        for m in rule["matches"]:
            assert m["path"]["value"].startswith("/v1"), "only the API goes out"
        for b in rule["backendRefs"]:
            if b["kind"] == "InferencePool":
                assert ("InferencePool", b["name"]) in gw
            else:
                svc = rendered["cpu"][("Service", b["name"])]
                assert b["port"] in {p["port"] for p in svc["spec"]["ports"]}
    role = gw[("Role", "loraplex-epp")]
    binding = gw[("RoleBinding", "loraplex-epp")]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == epp["spec"]["template"]["spec"]["serviceAccountName"]


# -- Grafana ------------------------------------------------------------------------------------


def test_grafana_dashboard_queries_exposed_metrics(exposed):
    dash = json.loads((DEPLOY / "grafana" / "loraplex.json").read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    used = set()
    for p in panels:
        assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            _check_promql(t["expr"], exposed)
            used |= _metric_names(t["expr"])
            names = _metric_names(t["expr"]) - NO_SAMPLES
            if not names:
                continue
            labels = set().union(*(exposed[n] for n in names)) | TARGET_LABELS
            for placeholder in re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")):
                assert placeholder in labels, (p["title"], placeholder)
    families = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in used}
    wanted = {
        "loraplex_generation_tokens", "loraplex_prompt_tokens", "loraplex_requests",
        "loraplex_time_to_first_token_seconds", "loraplex_inter_token_latency_seconds",
        "loraplex_e2e_request_latency_seconds", "loraplex_num_requests_waiting",
        "loraplex_num_requests_running", "loraplex_pool_pages_used", "loraplex_kv_cache_usage_perc",
        "loraplex_adapters_loaded", "loraplex_adapter_loads", "loraplex_adapter_evictions",
        "loraplex_finetune_jobs", "loraplex_finetune_trained_tokens", "loraplex_finetune_loss",
        "loraplex_finetune_step_seconds",
    }  # fmt: skip
    assert wanted <= families, sorted(wanted - families)
    kinds = {v["name"]: v["type"] for v in dash["templating"]["list"]}
    assert kinds["datasource"] == "datasource"


# -- images and compose -------------------------------------------------------------------------


def _dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) of each instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DOCKER / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _entrypoint_argv(name: str) -> list[str]:
    inst = dict(_dockerfile(name))
    return json.loads(inst["ENTRYPOINT"]) + json.loads(inst["CMD"])


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile(name):
    inst = _dockerfile(name)
    words = [w for w, _ in inst]
    assert words.count("FROM") >= 2 and any(
        w == "COPY" and r.startswith("--from=") for w, r in inst
    ), "multi-stage"
    health = [r for w, r in inst if w == "HEALTHCHECK"]
    assert len(health) == 1 and "/health" in health[0] and "--start-period" in health[0]
    user = [r for w, r in inst if w == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert words.index("USER") < words.index("ENTRYPOINT")
    (volumes,) = [json.loads(r) for w, r in inst if w == "VOLUME"]
    assert {"/models", "/adapters", "/finetune"} <= set(volumes)
    runs = [r for w, r in inst if w == "RUN"]
    for r in runs:
        assert not re.search(r"huggingface|hf_hub|snapshot_download|from_pretrained|\bwget\b|"
                             r"\bcurl\b|git lfs|hf download", r), r  # fmt: skip
    torch_at = [i for i, r in enumerate(runs) if "pip install torch==2.13.0" in r]
    package_at = [i for i, r in enumerate(runs) if re.search(r"pip install /src\b", r)]
    assert torch_at and package_at and torch_at[0] < package_at[0], "torch first, as the README"
    cpu_index = "--index-url https://download.pytorch.org/whl/cpu"
    assert (cpu_index in runs[torch_at[0]]) == (name == "Dockerfile.cpu")
    if name == "Dockerfile.cuda":
        assert any(w == "ARG" and "nvidia/cuda:" in r for w, r in inst)
    argv = _entrypoint_argv(name)
    assert argv[:2] == ["loraplex", "serve"] and "0.0.0.0" in argv
    args = _serve_args(argv[2:])
    assert (args.host, args.port, args.adapter_root, args.finetune_dir) == (
        "0.0.0.0", 8000, "/adapters", "/finetune")  # fmt: skip
    assert f"EXPOSE {args.port}" in {f"{w} {r}" for w, r in inst}
    # the build context holds what COPY takes
    ignore = (ROOT / ".dockerignore").read_text().split()
    kept = {p[1:] for p in ignore if p.startswith("!")}
    for w, r in inst:
        if w == "COPY" and not r.startswith("--from="):
            for src in r.split()[:-1]:
                assert src in kept and (ROOT / src).exists(), src


def test_compose_file():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"loraplex", "prometheus", "grafana"}
    named = set(compose["volumes"])
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = re.match(r"(\$\{[^}]*\}|[^:]+):", vol).group(1)
            default = re.fullmatch(r"\$\{\w+:-(\w+)\}", src)
            if default:
                assert default.group(1) in named, vol
            elif src.startswith((".", "/")):
                assert (DOCKER / src).resolve().exists(), vol
            else:
                assert src in named, vol
    srv = services["loraplex"]
    ctx = (DOCKER / srv["build"]["context"]).resolve()
    assert ctx == ROOT and (ctx / srv["build"]["dockerfile"]).is_file()
    args = _serve_args(_entrypoint_argv(Path(srv["build"]["dockerfile"]).name)[2:] + srv["command"])
    grace = srv["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > args.shutdown_timeout
    assert srv["ports"] == [f"127.0.0.1:{args.port}:{args.port}"]
    prom_mount = [v for v in services["prometheus"]["volumes"] if "prometheus.yml" in v][0]
    prom = yaml.safe_load((DOCKER / prom_mount.split(":")[0]).read_text())
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"loraplex:{args.port}"]
    graf = services["grafana"]["volumes"]
    (dash,) = [v for v in graf if v.endswith("loraplex.json:ro") or "loraplex.json:" in v]
    assert (DOCKER / dash.split(":")[0]).resolve() == DEPLOY / "grafana" / "loraplex.json"
    prov = DOCKER / "grafana" / "provisioning"
    (provider,) = yaml.safe_load((prov / "dashboards" / "loraplex.yaml").read_text())["providers"]
    assert provider["options"]["path"] == str(Path(dash.split(":")[1]).parent)
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    # the GPU override: the CUDA image's entrypoint, its arguments, a GPU, a longer stop
    gpu = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())["services"]["loraplex"]
    dockerfile = gpu["build"]["dockerfile"]
    assert (ctx / dockerfile).is_file() and dockerfile.endswith("Dockerfile.cuda")
    args = _serve_args(_entrypoint_argv(Path(dockerfile).name)[2:] + gpu["command"])
    assert args.device == "cuda" and args.model.startswith("/models/")
    assert float(gpu["stop_grace_period"].removesuffix("s")) > args.shutdown_timeout
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


# -- sizing ------------------------------------------------------------------------------------


def _sizing():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sizing", DEPLOY / "sizing.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sizing_matches_the_engine_and_the_docs():
    from loraplex.engine.config import EngineConfig
    from loraplex.engine.engine import Engine
    from loraplex.engine.loader import load_model_spec

    sizing = _sizing()
    m = tiny_model()
    spec = load_model_spec(m["model"])
    engine = Engine(EngineConfig(model=m["model"], **engine_kwargs()), dict(m["adapters"]))
    assert sizing.page_bytes(spec, engine.config.block_size, "float32") == engine.page_bytes
    infos = engine.adapters.list()
    assert len(infos) == len(m["adapters"])
    for info in infos:
        pages = sizing.adapter_pages(spec, info.rank, info.target_modules, 16)
        assert pages == info.num_pages, info.name
    assert sizing.kv_pages(33, 16) == 3
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert sizing.main([]) == 0
    docs = (ROOT / "docs" / "deploy.md").read_text()
    block = re.search(r"```\n\$ \.venv/bin/python deploy/sizing\.py\n(.*?)```", docs, re.S)
    assert block, "docs/deploy.md shows the sizing script's output"
    assert block.group(1) == out.getvalue(), "rerun deploy/sizing.py and update docs/deploy.md"
