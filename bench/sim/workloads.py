"""Workloads for the routing evaluation: synthetic generators and loaders of the real traces.

Each workload is a list of :class:`Req` in arrival order. ``session`` ties the requests of one
conversation or agent run together; ``after`` (seconds) is how long after the session's previous
request *finished* this one is sent (think time, tool time): sessions are closed loops, so a
session never has two requests in flight, while different sessions interleave freely. A session's
first request is sent at ``start``. Traces are read from ../shared/traces, never copied.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

TRACES = Path(__file__).resolve().parents[3] / "shared" / "traces"

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more write "
         "go see number no way could people my than first water been call who oil its now find long down day did "
         "get come made may part flight booking refund policy agent customer python function error test").split()


@dataclass
class Req:
    session: str
    messages: list[dict]
    output_tokens: int = 32
    tools: list | None = None
    start: float = 0.0  # first request of a session: when it is sent
    after: float = 0.0  # later requests: delay after the previous one finished
    body: dict = field(default_factory=dict)

    def request_body(self, model: str = "fake-model") -> dict:
        b = {"model": model, "messages": self.messages, "max_tokens": self.output_tokens}
        if self.tools:
            b["tools"] = self.tools
        return b


def words(rng: random.Random, n_chars: int) -> str:
    out, size = [], 0
    while size < n_chars:
        w = rng.choice(WORDS)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n_chars]


def _spread(sessions: list[list[Req]], rate: float, rng: random.Random) -> list[Req]:
    """Session starts as a Poisson process of ``rate`` sessions per second."""
    t = 0.0
    out = []
    for s in sessions:
        t += rng.expovariate(rate)
        s[0].start = t
        out.extend(s)
    return out


def shared_prefix(rng: random.Random, groups: int = 16, prompts: int = 16, system_chars: int = 8000,
                  question_chars: int = 400, rate: float = 4.0) -> list[Req]:
    """SGLang's generated-shared-prefix benchmark: G groups x P one-turn prompts, shuffled."""
    systems = [words(rng, system_chars) for _ in range(groups)]
    sessions = [[Req(f"g{g}p{p}", [{"role": "system", "content": systems[g]}, {"role": "user", "content": words(rng, question_chars)}], 64)]
                for g in range(groups) for p in range(prompts)]
    rng.shuffle(sessions)
    return _spread(sessions, rate, rng)


def multi_turn(rng: random.Random, sessions: int = 48, turns: int = 6, shared_chars: int = 3000, session_chars: int = 2000,
               turn_chars: int = 300, rate: float = 1.5) -> list[Req]:
    """Chat sessions: a prefix shared by all, one per session, then turns with replies."""
    shared = words(rng, shared_chars)
    out = []
    for s in range(sessions):
        msgs = [{"role": "system", "content": shared + "\n" + words(rng, session_chars)}]
        conv = []
        for t in range(turns):
            msgs = msgs + [{"role": "user", "content": words(rng, turn_chars)}]
            conv.append(Req(f"chat{s}", msgs, 48, after=rng.expovariate(1 / 2.0)))
            msgs = msgs + [{"role": "assistant", "content": words(rng, 48 * 4)}]
        out.append(conv)
    return _spread(out, rate, rng)


def _agent_session(name: str, traj: list[dict], rng: random.Random, tools: list | None = None) -> list[Req]:
    """One request per assistant turn of a recorded trajectory: everything before it is the prompt."""
    clean = []
    for m in traj:
        m = {k: v for k, v in m.items() if k in ("role", "content", "tool_calls", "tool_call_id", "name")}
        if m.get("content") is None and not m.get("tool_calls"):
            m["content"] = ""
        clean.append(m)
    reqs = []
    for i, m in enumerate(clean):
        if m["role"] == "assistant" and i > 0:
            out_tokens = max(8, len(json.dumps(m)) // 4)
            reqs.append(Req(name, clean[:i], min(out_tokens, 256), tools, after=rng.expovariate(1 / 0.5)))
    return reqs


def taubench(rng: random.Random, limit: int = 60, rate: float = 0.5) -> list[Req]:
    """Tool-using airline agent conversations (tau-bench, GPT-4o), all sharing a 6.2K system prompt."""
    data = json.loads((TRACES / "taubench_gpt4o_airline.json").read_text())[:limit]
    sessions = [s for s in (_agent_session(f"tau{i}", d["traj"], rng) for i, d in enumerate(data)) if s]
    return _spread(sessions, rate, rng)


def sweagent(rng: random.Random, copies: int = 12, rate: float = 0.3) -> list[Req]:
    """One real SWE-agent trajectory replayed by several concurrent agents (each with its own issue id)."""
    hist = json.loads((TRACES / "sweagent_marshmallow_fc.traj").read_text())["history"]
    sessions = []
    for c in range(copies):
        traj = [dict(m) for m in hist]
        # each copy works on its own task: the first user message differs, the system prompt is shared
        for m in traj:
            if m.get("role") == "user":
                m["content"] = f"[task {c}] " + (m["content"] if isinstance(m["content"], str) else json.dumps(m["content"]))
                break
        sessions.append(_agent_session(f"swe{c}", traj, rng))
    return _spread(sessions, rate, rng)


def loogle(rng: random.Random, questions_per_doc: int = 12, rate: float = 2.0) -> list[Req]:
    """Long shared documents (LooGLE), many questions each, arriving shuffled."""
    sessions = []
    for d, line in enumerate((TRACES / "loogle_shortdep_qa.jsonl").read_text().splitlines()):
        doc = json.loads(line)
        qa = ast.literal_eval(doc["qa_pairs"]) if isinstance(doc["qa_pairs"], str) else doc["qa_pairs"]
        for q in qa[:questions_per_doc]:
            sessions.append([Req(f"doc{d}q{len(sessions)}", [
                {"role": "system", "content": "Answer from the document.\n\n" + doc["input"]},
                {"role": "user", "content": q["Q"]},
            ], 32)])
    rng.shuffle(sessions)
    return _spread(sessions, rate, rng)


def mooncake(rng: random.Random, limit: int = 1000, time_scale: float = 1.0) -> list[Req]:
    """Mooncake's request trace: each 512-token hash block becomes a fixed 2,048-character chunk."""
    chunks: dict[int, str] = {}

    def chunk(h: int) -> str:
        if h not in chunks:
            r = random.Random(int.from_bytes(hashlib.sha256(str(h).encode()).digest()[:8], "big"))
            chunks[h] = words(r, 2048)
        return chunks[h]

    out = []
    for i, line in enumerate((TRACES / "mooncake_synthetic_trace.jsonl").read_text().splitlines()[:limit]):
        r = json.loads(line)
        text = "".join(chunk(h) for h in r["hash_ids"])
        req = Req(f"mc{i}", [{"role": "user", "content": text}], min(int(r["output_length"]), 256))
        req.start = r["timestamp"] / 1000.0 * time_scale
        out.append(req)
    return out


def structural_edits(rng: random.Random, sessions: int = 32, turns: int = 8, rate: float = 1.0) -> list[Req]:
    """Conversations whose next turn rewrites history: an earlier message edited, inserted or
    deleted, the history compacted into a summary, or 3-5 tool results added at once."""
    system = words(rng, 4000)
    tools = [{"type": "function", "function": {"name": f"tool{i}", "parameters": {"type": "object"}}} for i in range(4)]
    out = []
    for s in range(sessions):
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": words(rng, 600)}]
        conv = [Req(f"edit{s}", list(msgs), 32, tools)]
        for t in range(1, turns):
            msgs = msgs + [{"role": "assistant", "content": words(rng, 160)}]
            kind = rng.choice(["append", "edit", "insert", "delete", "compact", "tools"])
            editable = [i for i in range(1, len(msgs) - 1) if isinstance(msgs[i].get("content"), str)]
            if kind == "edit" and editable:
                i = rng.choice(editable)
                msgs[i] = {**msgs[i], "content": msgs[i]["content"][:-20] + words(rng, 20)}
            elif kind == "insert" and len(msgs) > 3:
                msgs.insert(rng.randrange(2, len(msgs)), {"role": "user", "content": words(rng, 200)})
            elif kind == "delete" and len(msgs) > 4 and msgs[-2].get("role") != "tool":
                del msgs[rng.randrange(2, len(msgs) - 1)]
            elif kind == "compact" and len(msgs) > 4:
                msgs = msgs[:1] + [{"role": "user", "content": "Summary so far: " + words(rng, 400)}] + msgs[-1:]
            elif kind == "tools":
                calls = [{"id": f"c{s}_{t}_{k}", "type": "function", "function": {"name": f"tool{k % 4}", "arguments": "{}"}} for k in range(rng.randint(3, 5))]
                msgs[-1] = {"role": "assistant", "content": None, "tool_calls": calls}
                msgs = msgs + [{"role": "tool", "tool_call_id": c["id"], "content": words(rng, 300)} for c in calls]
            msgs = msgs + [{"role": "user", "content": words(rng, 200)}]
            conv.append(Req(f"edit{s}", list(msgs), 32, tools, after=rng.expovariate(1 / 1.0)))
        out.append(conv)
    return _spread(out, rate, rng)


def _lognormal(rng: random.Random, mean: float, sigma: float) -> float:
    """A lognormal draw with the given mean (not median): lengths and times have long right tails."""
    import math

    return rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)


# Published statistics of human chat with LLMs (LMSYS-Chat-1M, Zheng et al. 2023, table 1): 2.0
# turns per conversation on average, 69.5 tokens per user prompt, 214.5 per response. At ~4
# characters a token. Think time between turns is not in that data set: reading a reply and typing
# the next message is taken as lognormal with a mean of 15 s (an assumption, stated in the report).
DIALOGUE_TURNS_MEAN = 2.0
DIALOGUE_PROMPT_CHARS = 69.5 * 4
DIALOGUE_REPLY_CHARS = 214.5 * 4
DIALOGUE_THINK_SECS = 15.0


def dialogue(rng: random.Random, sessions: int = 160, rate: float = 1.0, apps: int = 3, app_share: float = 0.7,
             turns_mean: float = DIALOGUE_TURNS_MEAN, prompt_chars: float = DIALOGUE_PROMPT_CHARS,
             reply_chars: float = DIALOGUE_REPLY_CHARS, think_secs: float = DIALOGUE_THINK_SECS, max_turns: int = 8) -> list[Req]:
    """Short multi-turn human dialogues shaped by LMSYS-Chat-1M: turns 1 + geometric (mean 2.0, at
    most 8), user messages and replies lognormal around the published means, a short system prompt
    of one of a few apps for most conversations (none for the rest), think time between turns."""
    systems = [f"You are the assistant of app {a}. " + words(rng, 300 + 200 * a) for a in range(apps)]
    out = []
    p_more = 1 - 1 / turns_mean
    for s in range(sessions):
        msgs = [{"role": "system", "content": rng.choice(systems)}] if rng.random() < app_share else []
        turns = 1
        while turns < max_turns and rng.random() < p_more:
            turns += 1
        conv = []
        for t in range(turns):
            msgs = msgs + [{"role": "user", "content": words(rng, max(8, int(_lognormal(rng, prompt_chars, 1.0))))}]
            reply = words(rng, max(8, int(_lognormal(rng, reply_chars, 0.8))))
            conv.append(Req(f"dlg{s}", msgs, min(512, max(4, len(reply) // 4)), after=_lognormal(rng, think_secs, 1.0)))
            msgs = msgs + [{"role": "assistant", "content": reply}]
        out.append(conv)
    return _spread(out, rate, rng)


def dialogue_long(rng: random.Random) -> list[Req]:
    """A held-out variant of :func:`dialogue` with other statistics (not tuned on, and not from a
    publication: an assumption of longer use): twice the turns, twice the message lengths, longer
    think time, more apps and fewer conversations with a system prompt."""
    return dialogue(rng, sessions=96, rate=0.6, apps=6, app_share=0.5, turns_mean=4.0, prompt_chars=2 * DIALOGUE_PROMPT_CHARS,
                    reply_chars=2 * DIALOGUE_REPLY_CHARS, think_secs=30.0, max_turns=12)


WORKLOADS = {
    "shared_prefix": shared_prefix,
    "multi_turn": multi_turn,
    "taubench": taubench,
    "sweagent": sweagent,
    "loogle": loogle,
    "mooncake": mooncake,
    "structural_edits": structural_edits,
    "dialogue": dialogue,
    "dialogue_long": dialogue_long,
}
