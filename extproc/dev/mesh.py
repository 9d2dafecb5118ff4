"""The Istio and Envoy Gateway objects that put prefix-router into a gateway, generated from
``envoy/duplex.yaml`` so that they cannot drift from the Envoy config the tests run.

    python -m extproc.dev.mesh            (make mesh) writes them into deploy/kubernetes/overlays/
    python -m extproc.dev.mesh --check    fails when the committed files are stale

What each gateway needs, taken from ``envoy/duplex.yaml``: the early removal of the client's
``x-upstream-host`` (and the ticket and request id), the ext_proc filter before the router, the gRPC
access log that tells the service a request finished, the ``pinned`` route first in the virtual
host, the ORIGINAL_DST cluster, and the health checks, outlier detection and circuit breakers of
the service's cluster; and for ``--observe-sample``, the observing filter after the ext_proc filter,
switched off on the virtual host and on again only on the ``pinned_observed`` route, which goes
before ``pinned``. The gateways name the service's cluster themselves; that name is the one thing
changed.

For the tests, :func:`istio_bootstrap` and :func:`eg_bootstrap` apply these patches to a skeleton
shaped like what each control plane generates (its names, its listener and route layout), the way
the control plane applies them, and the real Envoy validates the result (``envoy --mode validate``).
The skeletons are this project's model of Istio's and Envoy Gateway's output; neither control
plane ran here.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "envoy" / "duplex.yaml"
OVERLAYS = ROOT / "deploy" / "kubernetes" / "overlays"

NAMESPACE = "llm"  # where the service, its Service and the sglang-routers run
SERVICE = "prefix-router"
GRPC_PORT = 50051
HOST = "llm.example.com"  # the gateway's host name: change it with your Gateway / VirtualService

# Istio: the ingress gateway's workload and the cluster Istio makes for the service's port
ISTIO_GATEWAY_LABELS = {"istio": "ingressgateway"}
ISTIO_CLUSTER = f"outbound|{GRPC_PORT}||{SERVICE}.{NAMESPACE}.svc.cluster.local"
ISTIO_VHOST = f"{HOST}:80"

# Envoy Gateway: the Gateway the policies attach to, and the names EG gives what it generates
EG_GATEWAY = "llm-gateway"
EG_LISTENER = f"{NAMESPACE}/{EG_GATEWAY}/http"  # listener and route configuration: <ns>/<gateway>/<listener>
EG_CLUSTER = f"envoyextensionpolicy/{NAMESPACE}/{SERVICE}/0/{SERVICE}"
EG_FILTER = f"envoy.filters.http.ext_proc/envoyextensionpolicy/{NAMESPACE}/{SERVICE}/extproc/0"

HCM = "envoy.filters.network.http_connection_manager"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "envoy.filters.http.router"
OBSERVE_FILTER = "prefix_router.observe"  # envoy/duplex.yaml's observing filter (--observe-sample)
# what the service's cluster takes from envoy/duplex.yaml's (the circuit breakers: observing streams
# last as long as responses, past Envoy's default 1,024 at once)
SERVICE_CLUSTER_KEYS = ("health_checks", "outlier_detection", "common_lb_config", "circuit_breakers")


class Header(yaml.SafeDumper):
    """Block YAML, keys in the order written."""


def _dump(docs: list[dict], header: str) -> str:
    body = yaml.dump_all(docs, Dumper=Header, sort_keys=False, default_flow_style=False, width=120)
    return "".join(f"# {line}".rstrip() + "\n" for line in header.strip().splitlines()) + body


# -- what envoy/duplex.yaml holds ------------------------------------------------------------------


def pieces(source: Path = SOURCE) -> dict[str, Any]:
    """The parts of the shipped config a gateway needs, by name (deep copies)."""
    cfg = yaml.safe_load(source.read_text())
    listener = cfg["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    vhost = hcm["route_config"]["virtual_hosts"][0]
    routes = vhost["routes"]
    service = clusters["prefix_router"]
    return copy.deepcopy({
        "early_header_mutation_extensions": hcm["early_header_mutation_extensions"],
        "grpc_access_log": next(a for a in hcm["access_log"] if a["name"] == "envoy.access_loggers.http_grpc"),
        "ext_proc": next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc"),
        "observe_filter": next(f for f in hcm["http_filters"] if f["name"] == OBSERVE_FILTER),
        "observe_off": vhost["typed_per_filter_config"],  # the observing filter, off on the virtual host
        "pinned_route": next(r for r in routes if r["name"] == "pinned"),
        "observed_route": next(r for r in routes if r["name"] == "pinned_observed"),
        "pinned_cluster": clusters["sglang_routers_pinned"],
        "service_cluster": {k: service[k] for k in SERVICE_CLUSTER_KEYS},
    })


def _to_cluster(p: dict[str, Any], cluster: str) -> dict[str, Any]:
    """The ext_proc filter and the access log aimed at the gateway's name for the service."""
    p = copy.deepcopy(p)
    p["ext_proc"]["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = cluster
    p["observe_filter"]["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = cluster
    p["grpc_access_log"]["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = cluster
    return p


# -- Istio -----------------------------------------------------------------------------------------


def istio_envoyfilter(p: dict[str, Any]) -> dict[str, Any]:
    p = _to_cluster(p, ISTIO_CLUSTER)
    gateway = {"context": "GATEWAY"}
    on_hcm = {**gateway, "listener": {"filterChain": {"filter": {"name": HCM}}}}

    # fresh dicts each time: a shared one would be written as a YAML alias
    def before_router() -> dict:
        return {**gateway, "listener": {"filterChain": {"filter": {"name": HCM, "subFilter": {"name": ROUTER}}}}}

    def on_vhost() -> dict:
        return {**gateway, "routeConfiguration": {"vhost": {"name": ISTIO_VHOST}}}

    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {"name": SERVICE, "namespace": "istio-system"},
        "spec": {
            "workloadSelector": {"labels": dict(ISTIO_GATEWAY_LABELS)},
            "configPatches": [
                {  # before anything else, route selection included: a client's header never counts
                    "applyTo": "NETWORK_FILTER", "match": on_hcm,
                    "patch": {"operation": "MERGE", "value": {"typed_config": {
                        "@type": HCM_TYPE,
                        "early_header_mutation_extensions": p["early_header_mutation_extensions"],
                        "access_log": [p["grpc_access_log"]],  # merged: appended to Istio's own
                    }}},
                },
                {
                    "applyTo": "HTTP_FILTER",
                    "match": before_router(),
                    "patch": {"operation": "INSERT_BEFORE", "value": p["ext_proc"]},
                },
                {  # after the ext_proc filter (inserted before the router after it)
                    "applyTo": "HTTP_FILTER",
                    "match": before_router(),
                    "patch": {"operation": "INSERT_BEFORE", "value": p["observe_filter"]},
                },
                {  # the observing filter is off on the host's routes but pinned_observed
                    "applyTo": "VIRTUAL_HOST",
                    "match": on_vhost(),
                    "patch": {"operation": "MERGE", "value": {"typed_per_filter_config": p["observe_off"]}},
                },
                {  # first in the virtual host: taken only once the service set x-upstream-host
                    "applyTo": "HTTP_ROUTE",
                    "match": on_vhost(),
                    "patch": {"operation": "INSERT_FIRST", "value": p["pinned_route"]},
                },
                {  # before it: a sampled request's, whose response the observing filter reads
                    "applyTo": "HTTP_ROUTE",
                    "match": on_vhost(),
                    "patch": {"operation": "INSERT_FIRST", "value": p["observed_route"]},
                },
                {"applyTo": "CLUSTER", "match": gateway, "patch": {"operation": "ADD", "value": p["pinned_cluster"]}},
                {  # Istio's cluster for the service, given the health checks of envoy/duplex.yaml
                    "applyTo": "CLUSTER",
                    "match": {**gateway, "cluster": {"service": f"{SERVICE}.{NAMESPACE}.svc.cluster.local", "portNumber": GRPC_PORT}},
                    "patch": {"operation": "MERGE", "value": p["service_cluster"]},
                },
            ],
        },
    }


def _merge(dst: dict, src: dict) -> None:
    """Protobuf merge, as Istio's MERGE does: messages merge, repeated fields append, scalars replace."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        elif isinstance(v, list) and isinstance(dst.get(k), list):
            dst[k].extend(copy.deepcopy(v))
        else:
            dst[k] = copy.deepcopy(v)


def istio_skeleton() -> dict[str, Any]:
    """A gateway as Istio generates it for a Gateway on port 80 and a VirtualService for HOST that
    sends everything to the sglang-router Service (the fallback way)."""
    routers = f"outbound|30000||sglang-router.{NAMESPACE}.svc.cluster.local"

    def cluster(name: str) -> dict:
        return {"name": name, "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "port_value": 1}}}}]}]}}

    service = cluster(ISTIO_CLUSTER)
    service["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}
    return {
        "static_resources": {
            "listeners": [{
                "name": "0.0.0.0_8080",
                "address": {"socket_address": {"address": "0.0.0.0", "port_value": 8080}},
                "filter_chains": [{"filters": [{"name": HCM, "typed_config": {
                    "@type": HCM_TYPE,
                    "stat_prefix": "outbound_0.0.0.0_8080",
                    "route_config": {"name": "http.8080", "virtual_hosts": [{
                        "name": ISTIO_VHOST, "domains": [HOST, f"{HOST}:*"],
                        "routes": [{"name": "default", "match": {"prefix": "/"}, "route": {"cluster": routers, "timeout": "0s"}}],
                    }]},
                    "http_filters": [{"name": ROUTER, "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                }}]}],
            }],
            "clusters": [service, cluster(routers)],
        },
    }


def istio_bootstrap(envoyfilter: dict[str, Any]) -> dict[str, Any]:
    """The skeleton with the EnvoyFilter's patches applied as Istio applies them (the operations
    this EnvoyFilter uses; anything else raises)."""
    boot = istio_skeleton()
    listener = boot["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]
    clusters = boot["static_resources"]["clusters"]

    def vhost(match: dict) -> dict:
        return next(v for v in hcm["typed_config"]["route_config"]["virtual_hosts"] if v["name"] == match["routeConfiguration"]["vhost"]["name"])

    for cp in envoyfilter["spec"]["configPatches"]:
        op, value, match = cp["patch"]["operation"], copy.deepcopy(cp["patch"]["value"]), cp["match"]
        assert match["context"] == "GATEWAY"
        if cp["applyTo"] == "NETWORK_FILTER" and op == "MERGE":
            assert match["listener"]["filterChain"]["filter"]["name"] == hcm["name"]
            _merge(hcm, value)
        elif cp["applyTo"] == "HTTP_FILTER" and op == "INSERT_BEFORE":
            filters = hcm["typed_config"]["http_filters"]
            sub = match["listener"]["filterChain"]["filter"]["subFilter"]["name"]
            filters.insert(next(i for i, f in enumerate(filters) if f["name"] == sub), value)
        elif cp["applyTo"] == "VIRTUAL_HOST" and op == "MERGE":
            _merge(vhost(match), value)
        elif cp["applyTo"] == "HTTP_ROUTE" and op == "INSERT_FIRST":
            vhost(match)["routes"].insert(0, value)
        elif cp["applyTo"] == "CLUSTER" and op == "ADD":
            clusters.append(value)
        elif cp["applyTo"] == "CLUSTER" and op == "MERGE":
            c = match["cluster"]
            name = f"outbound|{c['portNumber']}||{c['service']}"
            _merge(next(x for x in clusters if x["name"] == name), value)
        else:
            raise ValueError(f"no model of {cp['applyTo']} {op}")
    return boot


# -- Envoy Gateway ---------------------------------------------------------------------------------


def eg_extension_policy(p: dict[str, Any]) -> dict[str, Any]:
    ext = p["ext_proc"]["typed_config"]
    return {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "EnvoyExtensionPolicy",
        "metadata": {"name": SERVICE, "namespace": NAMESPACE},
        "spec": {
            "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": EG_GATEWAY}],
            "extProc": [{
                "backendRefs": [{"group": "", "kind": "Service", "name": SERVICE, "port": GRPC_PORT}],
                "failOpen": ext["failure_mode_allow"],
                "messageTimeout": ext["message_timeout"],
                "processingMode": {"request": {"body": "FullDuplexStreamed"}},
            }],
        },
    }


def eg_patch_policy(p: dict[str, Any]) -> dict[str, Any]:
    p = _to_cluster(p, EG_CLUSTER)
    ext = p["ext_proc"]["typed_config"]
    hcm = "/default_filter_chain/filters/0/typed_config"
    listener = "type.googleapis.com/envoy.config.listener.v3.Listener"
    cluster = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    route = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

    def op(type_: str, name: str, path: str, value: Any) -> dict:
        return {"type": type_, "name": name, "operation": {"op": "add", "path": path, "value": value}}

    return {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "EnvoyPatchPolicy",
        "metadata": {"name": SERVICE, "namespace": NAMESPACE},
        "spec": {
            "targetRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": EG_GATEWAY},
            "type": "JSONPatch",
            "jsonPatches": [
                op(cluster, p["pinned_cluster"]["name"], "", p["pinned_cluster"]),
                op(listener, EG_LISTENER, f"{hcm}/early_header_mutation_extensions", p["early_header_mutation_extensions"]),
                op(listener, EG_LISTENER, f"{hcm}/access_log/-", p["grpc_access_log"]),
                # what EnvoyExtensionPolicy cannot say; http_filters/0 is the ext_proc filter when it
                # is the gateway's only filter before the router (check: egctl config envoy-proxy listener)
                op(listener, EG_LISTENER, f"{hcm}/http_filters/0/typed_config/forward_rules", ext["forward_rules"]),
                op(listener, EG_LISTENER, f"{hcm}/http_filters/0/typed_config/grpc_service/timeout", ext["grpc_service"]["timeout"]),
                # the observing filter right after it (--observe-sample), off on the virtual host
                op(listener, EG_LISTENER, f"{hcm}/http_filters/1", p["observe_filter"]),
                op(route, EG_LISTENER, "/virtual_hosts/0/typed_per_filter_config", p["observe_off"]),
                op(route, EG_LISTENER, "/virtual_hosts/0/routes/0", p["pinned_route"]),
                op(route, EG_LISTENER, "/virtual_hosts/0/routes/0", p["observed_route"]),  # before pinned
                *(op(cluster, EG_CLUSTER, f"/{k}", v) for k, v in p["service_cluster"].items()),
            ],
        },
    }


def eg_skeleton(ext_policy: dict[str, Any]) -> dict[str, Any]:
    """A gateway as Envoy Gateway generates it for a Gateway with one HTTP listener, an HTTPRoute to
    the sglang-router Service, and the EnvoyExtensionPolicy translated (its ext_proc filter and
    cluster, named as Envoy Gateway names them)."""
    ep = ext_policy["spec"]["extProc"][0]
    assert ep["processingMode"]["request"]["body"] == "FullDuplexStreamed"
    routers = f"httproute/{NAMESPACE}/sglang-router/rule/0"

    def cluster(name: str, h2: bool = False) -> dict:
        c = {"name": name, "type": "STATIC", "connect_timeout": "10s",
             "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                 {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "port_value": 1}}}}]}]}}
        if h2:
            c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}
        return c

    ext_proc = {
        "name": EG_FILTER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "failure_mode_allow": ep["failOpen"],
            "message_timeout": ep["messageTimeout"],
            "grpc_service": {"envoy_grpc": {"cluster_name": EG_CLUSTER, "authority": f"{SERVICE}.{NAMESPACE}:{GRPC_PORT}"}, "timeout": "10s"},
            "processing_mode": {"request_header_mode": "SEND", "request_body_mode": "FULL_DUPLEX_STREAMED", "request_trailer_mode": "SEND",
                                "response_header_mode": "SKIP", "response_trailer_mode": "SKIP"},
        },
    }
    return {
        "static_resources": {
            "listeners": [{
                "name": EG_LISTENER,
                "address": {"socket_address": {"address": "0.0.0.0", "port_value": 10080}},
                "default_filter_chain": {"filters": [{"name": HCM, "typed_config": {
                    "@type": HCM_TYPE,
                    "stat_prefix": "http-10080",
                    "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog", "path": "/dev/stdout"}}],
                    "http_filters": [ext_proc, {"name": ROUTER, "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router", "suppress_envoy_headers": True}}],
                    "route_config": {"name": EG_LISTENER, "virtual_hosts": [{
                        "name": f"{EG_LISTENER}/{HOST.replace('.', '_')}", "domains": [HOST],
                        "routes": [{"name": f"{routers}/match/0/{HOST.replace('.', '_')}", "match": {"prefix": "/"},
                                    "route": {"cluster": routers}}],
                    }]},
                }}]},
            }],
            "clusters": [cluster(EG_CLUSTER, h2=True), cluster(routers)],
        },
    }


def _pointer(path: str) -> list[str]:
    return [seg.replace("~1", "/").replace("~0", "~") for seg in path.split("/")[1:]] if path else []


def eg_bootstrap(ext_policy: dict[str, Any], patch_policy: dict[str, Any]) -> dict[str, Any]:
    """The skeleton with the EnvoyPatchPolicy applied as Envoy Gateway applies it: each patch to
    the named resource (RFC 6902 through ``jsonpatch``), ``add`` with an empty path adding a new one."""
    import jsonpatch

    boot = eg_skeleton(ext_policy)
    res = boot["static_resources"]
    by_type = {
        "type.googleapis.com/envoy.config.listener.v3.Listener": res["listeners"],
        "type.googleapis.com/envoy.config.cluster.v3.Cluster": res["clusters"],
    }
    for jp in patch_policy["spec"]["jsonPatches"]:
        operation = copy.deepcopy(jp["operation"])
        if jp["type"] == "type.googleapis.com/envoy.config.route.v3.RouteConfiguration":
            hcm = res["listeners"][0]["default_filter_chain"]["filters"][0]["typed_config"]
            assert hcm["route_config"]["name"] == jp["name"]
            hcm["route_config"] = jsonpatch.apply_patch(hcm["route_config"], [operation])
            continue
        items = by_type[jp["type"]]
        if operation["path"] == "" and operation["op"] == "add":
            items.append(operation["value"])
            continue
        i = next(i for i, x in enumerate(items) if x["name"] == jp["name"])
        items[i] = jsonpatch.apply_patch(items[i], [operation])
    return boot


# -- the files -------------------------------------------------------------------------------------

_GENERATED = "Generated from envoy/duplex.yaml by `python -m extproc.dev.mesh` (make mesh); do not edit."


def render(source: Path = SOURCE) -> dict[Path, str]:
    p = pieces(source)
    return {
        OVERLAYS / "istio" / "envoyfilter.yaml": _dump([istio_envoyfilter(p)], f"""
{_GENERATED}
The ingress gateway (label istio=ingressgateway) gets what envoy/duplex.yaml has: the early removal of
the client's routing headers, the ext_proc filter before the router, the access log that reports each
request finished, the pinned route first in the virtual host {ISTIO_VHOST}, the ORIGINAL_DST cluster,
the health checks and circuit breakers of the service's cluster ({ISTIO_CLUSTER}), and for
--observe-sample the observing filter and its pinned_observed route.
The fallback route is your VirtualService's own (virtualservice.yaml): the routers' Service.
"""),
        OVERLAYS / "envoy-gateway" / "extension-policy.yaml": _dump([eg_extension_policy(p)], f"""
{_GENERATED}
The ext_proc filter on the Gateway {EG_GATEWAY}: full-duplex request bodies, fail open, headers only
as far as the service needs them (the rest is in patch-policy.yaml).
"""),
        OVERLAYS / "envoy-gateway" / "patch-policy.yaml": _dump([eg_patch_policy(p)], f"""
{_GENERATED}
What the Gateway API cannot say, patched into what Envoy Gateway generates for the Gateway {EG_GATEWAY}
(enable EnvoyPatchPolicy in Envoy Gateway's config: extensionApis.enableEnvoyPatchPolicy: true):
the ORIGINAL_DST cluster, the early removal of the client's routing headers, the access log that
reports each request finished, the ext_proc filter's header rules and stream timeout, the pinned route,
the health checks and circuit breakers of the service's cluster, and for --observe-sample the observing
filter and its pinned_observed route. The names are Envoy Gateway's: listener and route configuration
{EG_LISTENER}, cluster {EG_CLUSTER}.
"""),
    }


def main(argv: list[str] | None = None) -> int:
    a = argparse.ArgumentParser(prog="python -m extproc.dev.mesh", description=__doc__.split("\n\n")[0])
    a.add_argument("--check", action="store_true", help="fail when a committed file differs from what would be written")
    args = a.parse_args(argv)
    stale = []
    for path, text in render().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print("stale (run make mesh): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
