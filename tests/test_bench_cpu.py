"""bench.cpu's set-ups measure what they say: the floor answers exactly as the service does."""

import asyncio

from bench.cpu import _aiter, _Floor, _in_process_answers, bodies, request_messages, ticket_of


def test_the_floor_replays_the_services_own_answer():
    answers = asyncio.run(_in_process_answers())
    # duplex: the decision answers the headers, then the held body streams back
    assert [a.WhichOneof("response") for a in answers] == ["request_headers", "request_body"]
    assert ticket_of(answers)  # routed to an upstream, not refused

    async def floor_answers(body):
        return [r async for r in _Floor(answers).Process(_aiter(request_messages(body)), None)]

    assert asyncio.run(floor_answers(bodies(1)[0])) == answers


def test_the_requests_are_conversations_that_grow():
    import orjson

    payloads = bodies(64)
    turns = [len(orjson.loads(p)["messages"]) for p in payloads]
    # 16 sessions take turns: each session's next request extends its last one
    assert turns[16] == turns[0] + 2 and payloads[16].startswith(payloads[0][:-2])
