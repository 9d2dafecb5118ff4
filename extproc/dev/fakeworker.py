"""A fake SGLang worker: SGLang's and OpenAI's HTTP API over a simulated, bounded prefix cache.

There is no GPU here, so the local stack and the tests put these behind real sglang-router
instances. Each worker renders a prompt as a chat template would (ChatML-like: roles, tool
definitions and calls; the same renderer as the ``template`` routing form), counts tokens as
characters / 4, and keeps a least-recently-used cache of 16-token blocks chained by hash, like a
paged KV cache: the cached tokens it reports are the leading run of blocks it already held.
``prompt_tokens_details.cached_tokens`` (OpenAI) and ``meta_info.cached_tokens`` (``/generate``) carry
the figure, so hit rates through the whole stack are read exactly as from a real SGLang server.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import math
import time
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager, nullcontext
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
from aiohttp import http_exceptions, web

from ..payload import render_chat_template

CHARS_PER_TOKEN = 4
BLOCK_TOKENS = 16
BLOCK_CHARS = BLOCK_TOKENS * CHARS_PER_TOKEN


def token_count(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


class PrefixCache:
    """An LRU cache of prompt blocks; a block is keyed by the hash of everything up to its end."""

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_blocks = max(1, capacity_tokens // BLOCK_TOKENS)
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    @staticmethod
    def block_keys(text: str) -> list[bytes]:
        """Chained hashes of each complete block: equal keys mean equal prefixes."""
        keys = []
        h = hashlib.blake2b(digest_size=16)
        # Blocks over characters, not bytes, so that token estimates stay characters / 4.
        full = len(text) // BLOCK_CHARS
        for i in range(full):
            h.update(text[i * BLOCK_CHARS : (i + 1) * BLOCK_CHARS].encode("utf-8", "surrogatepass"))
            keys.append(h.copy().digest())
        return keys

    def cached_blocks(self, keys: list[bytes]) -> int:
        """How many leading blocks are cached (no side effect: the simulator's oracle peeks)."""
        hit = 0
        for k in keys:
            if k not in self._blocks:
                break
            hit += 1
        return hit

    def insert(self, keys: list[bytes]) -> None:
        blocks = self._blocks
        for k in keys:
            blocks[k] = None
            blocks.move_to_end(k)
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)

    def lookup_and_insert(self, text: str) -> tuple[int, int]:
        """Serve one prompt: returns (prompt tokens, cached tokens), then caches the prompt."""
        keys = self.block_keys(text)
        hit = self.cached_blocks(keys)
        self.insert(keys)
        prompt = token_count(text)
        return prompt, min(hit * BLOCK_TOKENS, prompt)


@dataclass
class WorkerStats:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    inflight: int = 0  # arrived and not answered yet
    running: int = 0  # of those, holding a slot (the rest wait for one: --max-running-requests)


class FakeWorker:
    def __init__(
        self,
        name: str,
        model: str = "fake-model",
        capacity_tokens: int = 1 << 20,
        output_tokens: int = 8,
        token_delay: float = 0.0,
        prefill_delay_per_token: float = 0.0,
        serial_prefill: bool = False,
        max_running_requests: int = 0,
    ) -> None:
        """``serial_prefill``: one prefill at a time, the others waiting their turn (their cache
        looked up on arrival, as the simulator's ``ServiceModel(serial_prefill=True)`` does): a GPU
        runs one prefill batch at a time, so requests piled on one worker queue for their first
        token, where side-by-side prefills would let load cost nothing (FIELD-NOTES).
        ``max_running_requests``: at most this many requests run at once (SGLang's flag of that
        name; 0: no limit), each from its prefill to its last token; the others wait for a slot
        before their cache is looked up, as the simulator's ``Topology.batch`` does."""
        self.name = name
        self.model = model
        self.cache = PrefixCache(capacity_tokens)
        self.output_tokens = output_tokens
        self.token_delay = token_delay
        self.prefill_delay_per_token = prefill_delay_per_token
        self._prefill_turn = asyncio.Lock() if serial_prefill else None
        self.max_running_requests = max_running_requests
        self._slots = asyncio.Semaphore(max_running_requests) if max_running_requests > 0 else None
        self.stats = WorkerStats()

    # -- the simulated engine --------------------------------------------------------------------

    async def _prefill(self, prompt_text: str) -> tuple[int, int]:
        prompt, cached = self.cache.lookup_and_insert(prompt_text)
        self.stats.requests += 1
        self.stats.prompt_tokens += prompt
        self.stats.cached_tokens += cached
        if self.prefill_delay_per_token:
            if self._prefill_turn is None:
                await self._compute((prompt - cached) * self.prefill_delay_per_token)
            else:
                async with self._prefill_turn:
                    await self._compute((prompt - cached) * self.prefill_delay_per_token)
        return prompt, cached

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        """One of the ``max_running_requests`` slots, held from the prefill to the last token."""
        async with self._slots or nullcontext():
            self.stats.running += 1
            try:
                yield
            finally:
                self.stats.running -= 1

    async def _compute(self, seconds: float) -> None:
        """The time a prefill takes: only waited, there is no model."""
        await asyncio.sleep(seconds)

    def _tokens(self, n: int) -> list[str]:
        return [f" tok{i}" for i in range(n)]

    def _max_tokens(self, body: dict) -> int:
        for key in ("max_completion_tokens", "max_tokens"):
            v = body.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return min(v, self.output_tokens)
        params = body.get("sampling_params")
        if isinstance(params, dict) and isinstance(params.get("max_new_tokens"), int) and params["max_new_tokens"] > 0:
            return min(params["max_new_tokens"], self.output_tokens)
        return self.output_tokens

    # -- HTTP ------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/health_generate", self.health)
        # sglang-router 0.3.2 asks the new names first and warns when it falls back to the old ones
        for path in ("/model_info", "/get_model_info"):
            r.add_get(path, self.model_info)
        for path in ("/server_info", "/get_server_info"):
            r.add_get(path, self.server_info)
        r.add_get("/v1/models", self.models)
        r.add_get("/stats", self.get_stats)
        r.add_post("/v1/chat/completions", self.chat)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/generate", self.generate)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def model_info(self, request: web.Request) -> web.Response:
        # No model_path: with one, sglang-router would try to download a tokenizer.
        return web.json_response({"is_generation": True, "served_model_name": self.model})

    async def server_info(self, request: web.Request) -> web.Response:
        return web.json_response({"worker": self.name, "served_model_name": self.model, "fake": True,
                                  "max_running_requests": self.max_running_requests or None})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "prefix-router-fake"}]}
        )

    async def get_stats(self, request: web.Request) -> web.Response:
        s = self.stats
        return web.json_response(
            {"worker": self.name, "requests": s.requests, "prompt_tokens": s.prompt_tokens, "cached_tokens": s.cached_tokens, "inflight": s.inflight,
             "running": s.running}
        )

    async def _json(self, request: web.Request) -> dict:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise web.HTTPBadRequest(text='{"error":{"message":"invalid JSON","type":"invalid_request_error"}}', content_type="application/json")
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text='{"error":{"message":"body must be an object","type":"invalid_request_error"}}', content_type="application/json")
        return body

    def _usage(self, prompt: int, cached: int, completion: int) -> dict:
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        prompt_text = render_chat_template(body.get("messages"), body.get("tools") or body.get("functions"))
        return await self._openai(request, body, prompt_text, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        prompt = body.get("prompt")
        text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt)) if isinstance(prompt, list) else ""
        return await self._openai(request, body, text, chat=False)

    async def _openai(self, request: web.Request, body: dict, prompt_text: str, *, chat: bool) -> web.StreamResponse:
        self.stats.inflight += 1
        try:
            async with self._running():
                prompt, cached = await self._prefill(prompt_text)
                n = self._max_tokens(body)
                rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
                created = int(time.time())
                model = body.get("model") if isinstance(body.get("model"), str) else self.model
                obj = "chat.completion" if chat else "text_completion"
                headers = {"x-fake-worker": self.name}
                if not body.get("stream"):
                    for _ in range(n):
                        if self.token_delay:
                            await asyncio.sleep(self.token_delay)
                    text = "".join(self._tokens(n))
                    choice = {"index": 0, "finish_reason": "length" if n else "stop", "logprobs": None}
                    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                    return web.json_response(
                        {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": self.name,
                         "choices": [choice], "usage": self._usage(prompt, cached, n)},
                        headers=headers,
                    )
                resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache", **headers})
                await resp.prepare(request)
                chunk_obj = "chat.completion.chunk" if chat else "text_completion"

                async def send(payload: dict) -> None:
                    await resp.write(b"data: " + orjson.dumps(payload) + b"\n\n")

                for i, tok in enumerate(self._tokens(n)):
                    if self.token_delay:
                        await asyncio.sleep(self.token_delay)
                    delta = {"role": "assistant", "content": tok} if i == 0 else {"content": tok}
                    choice = {"index": 0, "finish_reason": "length" if i == n - 1 else None}
                    choice.update({"delta": delta} if chat else {"text": tok})
                    await send({"id": rid, "object": chunk_obj, "created": created, "model": model, "system_fingerprint": self.name, "choices": [choice]})
                opts = body.get("stream_options")
                if isinstance(opts, dict) and opts.get("include_usage"):
                    await send({"id": rid, "object": chunk_obj, "created": created, "model": model, "system_fingerprint": self.name,
                                "choices": [], "usage": self._usage(prompt, cached, n)})
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
                return resp
        finally:
            self.stats.inflight -= 1

    async def generate(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        text = body.get("text")
        if not isinstance(text, str):
            ids = body.get("input_ids")
            text = " ".join(map(str, ids)) if isinstance(ids, list) else ""
        self.stats.inflight += 1
        try:
            async with self._running():
                prompt, cached = await self._prefill(text)
                n = self._max_tokens(body)
                for _ in range(n):
                    if self.token_delay:
                        await asyncio.sleep(self.token_delay)
                return web.json_response(
                    {
                        "text": "".join(self._tokens(n)),
                        "meta_info": {"prompt_tokens": prompt, "cached_tokens": cached, "completion_tokens": n, "worker": self.name,
                                      "finish_reason": {"type": "length", "length": n}},
                    },
                    headers={"x-fake-worker": self.name},
                )
        finally:
            self.stats.inflight -= 1


class QuietProbes(logging.Filter):
    """sglang-router probes workers with an HTTP/2 preface (``PRI * HTTP/2.0``); aiohttp answers
    400 and logs a traceback for each, which reads like a failure. Drop exactly those records."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, http_exceptions.BadHttpMessage) and "PRI" in str(exc))


def worker_from_args(argv: list[str] | None = None) -> tuple[FakeWorker, argparse.Namespace]:
    """The worker the command line describes, and the options (host and port among them)."""
    p = argparse.ArgumentParser(prog="prefix-router-fake-worker", description="A fake SGLang worker with a simulated prefix cache (no GPU).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", default=None, help="worker name reported in responses (default host:port)")
    p.add_argument("--model", default="fake-model")
    p.add_argument("--capacity-tokens", type=int, default=1 << 20, help="prefix cache capacity in tokens (default 1048576)")
    p.add_argument("--output-tokens", type=int, default=8, help="tokens per response at most (default 8)")
    p.add_argument("--token-delay", type=float, default=0.0, help="seconds per output token (default 0)")
    p.add_argument("--prefill-delay-per-token", type=float, default=0.0, help="seconds per uncached prompt token (default 0)")
    p.add_argument("--serial-prefill", action="store_true", help="one prefill at a time, the others queued (default: side by side)")
    p.add_argument("--max-running-requests", type=int, default=0, metavar="N",
                   help="requests run at once, from prefill to last token; the rest wait for a slot (default 0: no limit)")
    a = p.parse_args(argv)
    if a.max_running_requests < 0:
        p.error("--max-running-requests must be 0 (no limit) or more")
    return FakeWorker(a.name or f"{a.host}:{a.port}", a.model, a.capacity_tokens, a.output_tokens, a.token_delay, a.prefill_delay_per_token,
                      a.serial_prefill, a.max_running_requests), a


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("aiohttp.server").addFilter(QuietProbes())
    worker, a = worker_from_args(argv)
    web.run_app(worker.app(), host=a.host, port=a.port, print=None, access_log=None, handle_signals=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
