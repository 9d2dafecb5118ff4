"""The admin gRPC API (protos/extproc/api/v1/admin.proto): the pool, dry-run decisions, tree size,
the running configuration."""

from __future__ import annotations

import asyncio
import hmac
from pathlib import Path
from typing import Callable

import grpc
import orjson

from . import logs, metrics
from .api.v1 import admin_pb2 as pb
from .api.v1 import admin_pb2_grpc as pb_grpc
from .config import Config
from .director import Director
from .discovery import Discovery
from .addresses import AddressError, parse_hostport

log = logs.get("prefix_router.adminapi")


def add_admin_api(api: "AdminApi", server: grpc.aio.Server) -> None:
    pb_grpc.add_AdminServicer_to_server(api, server)


def read_token(path: str) -> bytes:
    """The admin token: the file's content without surrounding white space; raises OSError."""
    token = Path(path).read_bytes().strip()
    if len(token) < 16:
        raise OSError(f"--admin-token-file {path}: the token must be at least 16 characters")
    return token


class TokenCheck(grpc.aio.ServerInterceptor):
    """Every admin call must carry ``authorization: Bearer <token>``; others get UNAUTHENTICATED."""

    def __init__(self, token: bytes) -> None:
        self.expected = b"Bearer " + token

    async def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        got = dict(details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(got.encode() if isinstance(got, str) else got, self.expected):
            return await continuation(details)
        metrics.ADMIN_DENIED.inc()
        log.warning("admin_denied", method=details.method)
        return _DENY


async def _deny(request: object, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the admin API needs authorization: Bearer <token> (--admin-token-file)")


_DENY = grpc.unary_unary_rpc_method_handler(_deny)


class AdminApi(pb_grpc.AdminServicer):
    def __init__(self, director: Director, discovery: Discovery, config: Callable[[], Config]) -> None:
        self.director = director
        self.discovery = discovery
        self.config = config

    def _list(self) -> pb.ListUpstreamsResponse:
        return pb.ListUpstreamsResponse(
            upstreams=[
                pb.Upstream(address=u.address, healthy=u.healthy, active_ok=u.active_ok, ejected=u.ejected, inflight=u.inflight, tree_characters=u.tree_characters,
                            workers=u.workers)
                for u in self.director.upstreams()
            ],
            configured=self.discovery.entries(),
        )

    async def ListUpstreams(self, request: pb.ListUpstreamsRequest, context: grpc.aio.ServicerContext) -> pb.ListUpstreamsResponse:  # noqa: N802
        return self._list()

    async def SetUpstreams(self, request: pb.SetUpstreamsRequest, context: grpc.aio.ServicerContext) -> pb.ListUpstreamsResponse:  # noqa: N802
        entries = [e.strip() for e in request.upstreams if e.strip()]
        if not entries:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "at least one upstream is required")
        try:
            for e in entries:
                parse_hostport(e)
        except AddressError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        refused = self.discovery.refusals(entries)
        if refused:
            log.error("upstreams_set_refused", entries=entries, reasons=refused)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "; ".join(refused))
        resolved = await asyncio.to_thread(self.discovery.resolve, entries)
        if not resolved:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"none of {entries} resolves")
        self.discovery.override = entries
        self.discovery.apply(resolved)
        log.info("upstreams_set", entries=entries, upstreams=resolved)
        return self._list()

    async def Explain(self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext) -> pb.ExplainResponse:  # noqa: N802
        e = self.director.explain(request.path or "/v1/chat/completions", request.body, request.content_encoding or None)
        return pb.ExplainResponse(
            upstream=e["upstream"] or "",
            reason=e["reason"],
            partition=e["partition"],
            text_characters=e["text_characters"],
            matched_characters=e["matched_characters"],
            match_rate=e["match_rate"],
            upstreams=[pb.UpstreamMatch(**u) for u in e["upstreams"]],
            no_text_reason=e["no_text_reason"] or "",
            routing_text_head=e["routing_text_head"],
            continuation=e["continuation"],
            new_prefix=e["new_prefix"],
            session=pb.SessionOutlook(**e["session"]) if e["session"] is not None else None,
        )

    async def TreeStats(self, request: pb.TreeStatsRequest, context: grpc.aio.ServicerContext) -> pb.TreeStatsResponse:  # noqa: N802
        t = self.director.tree_stats()
        return pb.TreeStatsResponse(
            stored_characters=t.stored_characters,
            nodes=t.nodes,
            characters_per_upstream=t.characters_per_upstream,
            max_tree_size=t.max_tree_size,
            observed_hit_ratio_per_upstream=t.observed_hit_ratio_per_upstream,
            learnt_budget_per_upstream=t.learnt_budget_per_upstream,
        )

    async def GetConfig(self, request: pb.GetConfigRequest, context: grpc.aio.ServicerContext) -> pb.GetConfigResponse:  # noqa: N802
        return pb.GetConfigResponse(config_json=orjson.dumps(self.config().as_dict()).decode())
