"""deploy/kubernetes: rendered by kustomize, checked against the Kubernetes schemas, its gateway
objects kept in step with envoy/duplex.yaml and accepted by the real Envoy once assembled.

No cluster runs here: what a control plane (Istio, Envoy Gateway) would do with the objects is
modelled by extproc.dev.mesh, and README "Deploying" says so."""

import copy
import subprocess

import kubernetes_validate
import pytest
import yaml

from extproc.cli import parser
from extproc.config import build
from extproc.dev import mesh
from extproc.dev.kubectl import find_kubectl
from extproc.dev.stack import ENVOY_DIR, find_envoy

K8S = mesh.ROOT / "deploy" / "kubernetes"
BUILDS = ["base", "overlays/istio", "overlays/envoy-gateway"]
METRICS = "examples/metrics"  # an overlay with the opt-in metrics component
K8S_VERSION = "1.33.0"  # the oldest minor still supported upstream when this was written
# Custom resources: no schema for them here; their Envoy payloads are validated by Envoy below.
CUSTOM = {
    ("networking.istio.io/v1alpha3", "EnvoyFilter"),
    ("networking.istio.io/v1", "Gateway"),
    ("networking.istio.io/v1", "VirtualService"),
    ("security.istio.io/v1", "AuthorizationPolicy"),
    ("security.istio.io/v1", "PeerAuthentication"),
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyExtensionPolicy"),
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyPatchPolicy"),
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyProxy"),
    ("gateway.networking.k8s.io/v1", "Gateway"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ("gateway.networking.k8s.io/v1", "BackendTLSPolicy"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
}


def kustomize(path: str) -> list[dict]:
    out = subprocess.run([find_kubectl(), "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=60, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {b: kustomize(b) for b in [*BUILDS, METRICS]}


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


# -- Kubernetes objects ----------------------------------------------------------------------------


@pytest.mark.parametrize("build_dir", [*BUILDS, METRICS])
def test_every_object_is_valid_against_the_kubernetes_schemas(rendered, build_dir):
    checked = 0
    for doc in rendered[build_dir]:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM:
            assert doc["metadata"]["name"] and doc["metadata"]["namespace"]
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        checked += 1
    assert checked >= 8  # SA, ConfigMap, Deployment, 2 Services, PDB, 2 NetworkPolicies (+ overlays' own)


def test_the_nats_example_is_valid_and_only_the_service_reaches_it():
    docs = [d for d in yaml.safe_load_all((K8S / "examples" / "nats.yaml").read_text()) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    policy = one(docs, "NetworkPolicy")
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "prefix-router"}}}],
                                          "ports": [{"port": 4222, "protocol": "TCP"}]}]


def test_the_validator_rejects_a_broken_object(rendered):
    """The check above can fail: a misspelt field is refused."""
    dep = copy.deepcopy(one(rendered["base"], "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def serve_config(container: dict, configmap: dict):
    """The configuration the container would run with: its args through the service's own parser,
    the ConfigMap as its environment."""
    args = vars(parser().parse_args(["serve", *container["args"]]))
    args.pop("command"), args.pop("print_config")
    return build(args, env=configmap["data"])


@pytest.mark.parametrize("build_dir", BUILDS)
def test_the_deployment_runs_safely_and_its_flags_are_the_services(rendered, build_dir):
    docs = rendered[build_dir]
    dep = one(docs, "Deployment", "prefix-router")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert dep["spec"]["replicas"] >= 2
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"] and not c["securityContext"]["allowPrivilegeEscalation"]
    assert {"readinessProbe", "livenessProbe"} <= set(c) and c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    cfg = serve_config(c, one(docs, "ConfigMap", "prefix-router"))
    assert cfg.admin_listen.startswith("127.0.0.1:")  # nothing outside the pod reaches it
    assert cfg.grpc_listen.endswith(":50051") and cfg.upstreams and cfg.sync_url
    assert "9464/readyz" in " ".join(c["readinessProbe"]["exec"]["command"])
    # the pod lives through its own shutdown: delay + drain inside the grace period
    assert cfg.shutdown_delay_secs + cfg.drain_timeout_secs < pod["terminationGracePeriodSeconds"]
    # the rules select the pods
    labels = dep["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        obj = one(docs, kind, "prefix-router")
        selector = obj["spec"]["selector"]
        assert (selector.get("matchLabels") or selector).items() <= labels.items()
    if build_dir == "overlays/istio":
        assert not cfg.grpc_tls_cert and labels["sidecar.istio.io/inject"] == "true"  # the mesh's mTLS
        assert not pod.get("volumes") or all(v["name"] != "tls" for v in pod["volumes"])
    else:
        assert cfg.grpc_tls_cert and cfg.grpc_tls_client_ca  # mutual TLS from the Secret
        tls = next(v for v in pod["volumes"] if v["name"] == "tls")
        assert tls["secret"]["secretName"] == "prefix-router-tls"


@pytest.mark.parametrize(
    "build_dir, gateway_namespace, gateway_labels",
    [
        ("base", "llm", {"app.kubernetes.io/name": "llm-gateway"}),
        ("overlays/istio", "istio-system", {"istio": "ingressgateway"}),
        ("overlays/envoy-gateway", "envoy-gateway-system",
         {"app.kubernetes.io/managed-by": "envoy-gateway", "gateway.envoyproxy.io/owning-gateway-name": "llm-gateway"}),
    ],
)
def test_only_the_gateway_reaches_the_grpc_port(rendered, build_dir, gateway_namespace, gateway_labels):
    policy = one(rendered[build_dir], "NetworkPolicy", "prefix-router-ingress")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prefix-router"}
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 50051, "protocol": "TCP"}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": gateway_namespace}},
                             "podSelector": {"matchLabels": gateway_labels}}]


def test_the_metrics_component_opens_metrics_to_prometheus_only(rendered):
    docs = rendered[METRICS]
    dep = one(docs, "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    cfg = serve_config(c, one(docs, "ConfigMap"))
    assert cfg.admin_listen == "0.0.0.0:9464"
    assert cfg.status_allowed_cidrs == ("127.0.0.0/8", "::1/128")  # the status page stays behind port-forward
    assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in c["ports"]
    (rule,) = one(docs, "NetworkPolicy", "prefix-router-metrics")["spec"]["ingress"]
    assert rule["ports"] == [{"port": 9464, "protocol": "TCP"}]
    assert rule["from"][0]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    assert one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    # without the component, no rule admits the admin port
    assert not [d for d in rendered["overlays/envoy-gateway"] if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "prefix-router-metrics"]


def test_discovery_goes_through_a_headless_service(rendered):
    docs = rendered["base"]
    routers = one(docs, "Service", "sglang-routers")
    assert routers["spec"]["clusterIP"] == "None"
    cfg = serve_config(one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0], one(docs, "ConfigMap"))
    assert cfg.upstreams == ("sglang-routers.llm.svc.cluster.local:30000",)
    # and an Envoy of one's own finds every replica the same way
    replicas = one(docs, "Service", "prefix-router-replicas")
    assert replicas["spec"]["clusterIP"] == "None" and replicas["spec"]["ports"][0]["port"] == 50051


def test_istio_lets_only_the_gateway_identity_call_the_service(rendered):
    docs = rendered["overlays/istio"]
    authz = one(docs, "AuthorizationPolicy")
    assert authz["spec"]["action"] == "ALLOW"
    assert authz["spec"]["rules"] == [{"from": [{"source": {"principals": ["cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"]}}],
                                       "to": [{"operation": {"ports": ["50051"]}}]}]
    assert one(docs, "PeerAuthentication")["spec"]["mtls"]["mode"] == "STRICT"


# -- the gateway objects and envoy/duplex.yaml -----------------------------------------------------


def test_the_committed_gateway_objects_are_the_generated_ones():
    assert mesh.main(["--check"]) == 0, "run make mesh"


def test_a_change_to_the_envoy_config_reaches_the_gateway_objects(tmp_path):
    changed = tmp_path / "duplex.yaml"
    changed.write_text((ENVOY_DIR / "duplex.yaml").read_text().replace("- remove: x-request-id", "- remove: x-request-id\n                        - remove: x-planted"))
    before, after = mesh.render(), mesh.render(changed)
    assert all("x-planted" not in t for t in before.values())
    assert all("x-planted" in t for p, t in after.items() if p.name != "extension-policy.yaml")


def envoy_validate(boot: dict, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(boot))
    return subprocess.run([find_envoy(), "--mode", "validate", "-c", str(path), "--log-level", "error"], capture_output=True, text=True, timeout=120)


def assembled() -> dict[str, dict]:
    p = mesh.pieces()
    return {
        "istio": mesh.istio_bootstrap(mesh.istio_envoyfilter(p)),
        "envoy-gateway": mesh.eg_bootstrap(mesh.eg_extension_policy(p), mesh.eg_patch_policy(p)),
    }


@pytest.mark.parametrize("gateway", ["istio", "envoy-gateway"])
def test_each_gateway_with_its_patches_is_accepted_by_envoy(tmp_path, gateway):
    r = envoy_validate(assembled()[gateway], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("gateway", ["istio", "envoy-gateway"])
def test_the_assembled_gateway_does_what_the_shipped_config_does(gateway):
    """Same early removal, same ext_proc settings (but the cluster's name), ext_proc then the
    observing filter before the router, the observing filter off on the virtual host and on only on
    pinned_observed, pinned_observed and pinned first, the same ORIGINAL_DST cluster, service
    health checks and circuit breakers."""
    shipped = yaml.safe_load((ENVOY_DIR / "duplex.yaml").read_text())["static_resources"]
    s_hcm = shipped["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    boot = assembled()[gateway]["static_resources"]
    chain = boot["listeners"][0].get("default_filter_chain") or boot["listeners"][0]["filter_chains"][0]
    hcm = chain["filters"][0]["typed_config"]
    service = mesh.ISTIO_CLUSTER if gateway == "istio" else mesh.EG_CLUSTER
    assert hcm["early_header_mutation_extensions"] == s_hcm["early_header_mutation_extensions"]
    names = [f["name"] for f in hcm["http_filters"]]
    ext = next(f for f in hcm["http_filters"] if "ext_proc" in f["name"])["typed_config"]
    assert names.index(next(n for n in names if "ext_proc" in n)) == len(names) - 3 and names[-2:] == [mesh.OBSERVE_FILTER, mesh.ROUTER]
    observe = hcm["http_filters"][-2]
    s_observe = copy.deepcopy(next(f for f in s_hcm["http_filters"] if f["name"] == mesh.OBSERVE_FILTER))
    s_observe["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = service
    assert observe == s_observe and observe["typed_config"]["observability_mode"] is True
    s_ext = copy.deepcopy(s_hcm["http_filters"][0]["typed_config"])
    s_ext["grpc_service"]["envoy_grpc"]["cluster_name"] = service
    for key in ("forward_rules", "failure_mode_allow", "message_timeout"):
        assert ext[key] == s_ext[key], key
    assert ext["grpc_service"]["timeout"] == s_ext["grpc_service"]["timeout"]
    assert ext["grpc_service"]["envoy_grpc"]["cluster_name"] == service
    mode = {k: v for k, v in s_ext["processing_mode"].items() if v != "NONE"}
    assert mode.items() <= ext["processing_mode"].items()
    grpc_log = next(a for a in hcm["access_log"] if a["name"] == "envoy.access_loggers.http_grpc")
    assert grpc_log["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == service
    assert grpc_log["typed_config"]["additional_request_headers_to_log"] == ["x-prefix-router-ticket", "x-upstream-host"]
    vhost = next(v for v in hcm["route_config"]["virtual_hosts"] if len(v["routes"]) > 1)
    s_vhost = s_hcm["route_config"]["virtual_hosts"][0]
    assert vhost["typed_per_filter_config"][mesh.OBSERVE_FILTER] == s_vhost["typed_per_filter_config"][mesh.OBSERVE_FILTER] == {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute", "disabled": True}
    # the shipped config's pinned_observed and pinned routes, in that order, before the gateway's own
    s_routes = {r["name"]: r for r in s_vhost["routes"]}
    assert vhost["routes"][:2] == [s_routes["pinned_observed"], s_routes["pinned"]]
    assert mesh.OBSERVE_FILTER in vhost["routes"][0]["typed_per_filter_config"]
    assert all(mesh.OBSERVE_FILTER not in r.get("typed_per_filter_config", {}) for r in vhost["routes"][1:])
    clusters = {c["name"]: c for c in boot["clusters"]}
    s_clusters = {c["name"]: c for c in shipped["clusters"]}
    assert clusters["sglang_routers_pinned"] == s_clusters["sglang_routers_pinned"]
    for key in ("health_checks", "outlier_detection", "common_lb_config", "circuit_breakers"):
        assert clusters[service][key] == s_clusters["prefix_router"][key], key


def test_envoy_refuses_an_assembly_missing_a_patch(tmp_path):
    """The validation above can fail: without the patch adding the ORIGINAL_DST cluster, the
    pinned route names a cluster that does not exist."""
    p = mesh.pieces()
    ef = mesh.istio_envoyfilter(p)
    ef["spec"]["configPatches"] = [cp for cp in ef["spec"]["configPatches"] if cp["patch"]["operation"] != "ADD"]
    r = envoy_validate(mesh.istio_bootstrap(ef), tmp_path)
    assert r.returncode != 0 and "sglang_routers_pinned" in r.stdout + r.stderr
