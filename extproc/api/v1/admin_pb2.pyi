from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Upstream(_message.Message):
    __slots__ = ("address", "healthy", "active_ok", "ejected", "inflight", "tree_characters", "workers")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_OK_FIELD_NUMBER: _ClassVar[int]
    EJECTED_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    TREE_CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    address: str
    healthy: bool
    active_ok: bool
    ejected: bool
    inflight: int
    tree_characters: int
    workers: int
    def __init__(self, address: _Optional[str] = ..., healthy: _Optional[bool] = ..., active_ok: _Optional[bool] = ..., ejected: _Optional[bool] = ..., inflight: _Optional[int] = ..., tree_characters: _Optional[int] = ..., workers: _Optional[int] = ...) -> None: ...

class ListUpstreamsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListUpstreamsResponse(_message.Message):
    __slots__ = ("upstreams", "configured")
    UPSTREAMS_FIELD_NUMBER: _ClassVar[int]
    CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    upstreams: _containers.RepeatedCompositeFieldContainer[Upstream]
    configured: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, upstreams: _Optional[_Iterable[_Union[Upstream, _Mapping]]] = ..., configured: _Optional[_Iterable[str]] = ...) -> None: ...

class SetUpstreamsRequest(_message.Message):
    __slots__ = ("upstreams",)
    UPSTREAMS_FIELD_NUMBER: _ClassVar[int]
    upstreams: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, upstreams: _Optional[_Iterable[str]] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("path", "body", "content_encoding")
    PATH_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    CONTENT_ENCODING_FIELD_NUMBER: _ClassVar[int]
    path: str
    body: bytes
    content_encoding: str
    def __init__(self, path: _Optional[str] = ..., body: _Optional[bytes] = ..., content_encoding: _Optional[str] = ...) -> None: ...

class UpstreamMatch(_message.Message):
    __slots__ = ("address", "matched_characters", "inflight", "healthy", "recompute_characters", "charged_requests", "cost", "observed_hit_ratio", "observed_responses", "new_prefixes_lately", "workers", "continuation_knee")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MATCHED_CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    CHARGED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_HIT_RATIO_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_RESPONSES_FIELD_NUMBER: _ClassVar[int]
    NEW_PREFIXES_LATELY_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_KNEE_FIELD_NUMBER: _ClassVar[int]
    address: str
    matched_characters: int
    inflight: int
    healthy: bool
    recompute_characters: int
    charged_requests: int
    cost: int
    observed_hit_ratio: float
    observed_responses: int
    new_prefixes_lately: int
    workers: int
    continuation_knee: int
    def __init__(self, address: _Optional[str] = ..., matched_characters: _Optional[int] = ..., inflight: _Optional[int] = ..., healthy: _Optional[bool] = ..., recompute_characters: _Optional[int] = ..., charged_requests: _Optional[int] = ..., cost: _Optional[int] = ..., observed_hit_ratio: _Optional[float] = ..., observed_responses: _Optional[int] = ..., new_prefixes_lately: _Optional[int] = ..., workers: _Optional[int] = ..., continuation_knee: _Optional[int] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("upstream", "reason", "partition", "text_characters", "matched_characters", "match_rate", "upstreams", "no_text_reason", "routing_text_head", "continuation", "session", "new_prefix")
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    TEXT_CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    MATCHED_CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    MATCH_RATE_FIELD_NUMBER: _ClassVar[int]
    UPSTREAMS_FIELD_NUMBER: _ClassVar[int]
    NO_TEXT_REASON_FIELD_NUMBER: _ClassVar[int]
    ROUTING_TEXT_HEAD_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    NEW_PREFIX_FIELD_NUMBER: _ClassVar[int]
    upstream: str
    reason: str
    partition: str
    text_characters: int
    matched_characters: int
    match_rate: float
    upstreams: _containers.RepeatedCompositeFieldContainer[UpstreamMatch]
    no_text_reason: str
    routing_text_head: str
    continuation: bool
    session: SessionOutlook
    new_prefix: bool
    def __init__(self, upstream: _Optional[str] = ..., reason: _Optional[str] = ..., partition: _Optional[str] = ..., text_characters: _Optional[int] = ..., matched_characters: _Optional[int] = ..., match_rate: _Optional[float] = ..., upstreams: _Optional[_Iterable[_Union[UpstreamMatch, _Mapping]]] = ..., no_text_reason: _Optional[str] = ..., routing_text_head: _Optional[str] = ..., continuation: _Optional[bool] = ..., session: _Optional[_Union[SessionOutlook, _Mapping]] = ..., new_prefix: _Optional[bool] = ...) -> None: ...

class SessionOutlook(_message.Message):
    __slots__ = ("new", "turn", "shared", "over", "family_turns", "evicted", "moved", "moves")
    NEW_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    OVER_FIELD_NUMBER: _ClassVar[int]
    FAMILY_TURNS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    MOVED_FIELD_NUMBER: _ClassVar[int]
    MOVES_FIELD_NUMBER: _ClassVar[int]
    new: bool
    turn: int
    shared: int
    over: bool
    family_turns: float
    evicted: bool
    moved: bool
    moves: bool
    def __init__(self, new: _Optional[bool] = ..., turn: _Optional[int] = ..., shared: _Optional[int] = ..., over: _Optional[bool] = ..., family_turns: _Optional[float] = ..., evicted: _Optional[bool] = ..., moved: _Optional[bool] = ..., moves: _Optional[bool] = ...) -> None: ...

class TreeStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TreeStatsResponse(_message.Message):
    __slots__ = ("stored_characters", "nodes", "characters_per_upstream", "max_tree_size", "observed_hit_ratio_per_upstream", "learnt_budget_per_upstream")
    class CharactersPerUpstreamEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ObservedHitRatioPerUpstreamEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class LearntBudgetPerUpstreamEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    STORED_CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    CHARACTERS_PER_UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    MAX_TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_HIT_RATIO_PER_UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    LEARNT_BUDGET_PER_UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    stored_characters: int
    nodes: int
    characters_per_upstream: _containers.ScalarMap[str, int]
    max_tree_size: int
    observed_hit_ratio_per_upstream: _containers.ScalarMap[str, float]
    learnt_budget_per_upstream: _containers.ScalarMap[str, int]
    def __init__(self, stored_characters: _Optional[int] = ..., nodes: _Optional[int] = ..., characters_per_upstream: _Optional[_Mapping[str, int]] = ..., max_tree_size: _Optional[int] = ..., observed_hit_ratio_per_upstream: _Optional[_Mapping[str, float]] = ..., learnt_budget_per_upstream: _Optional[_Mapping[str, int]] = ...) -> None: ...

class GetConfigRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetConfigResponse(_message.Message):
    __slots__ = ("config_json",)
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    config_json: str
    def __init__(self, config_json: _Optional[str] = ...) -> None: ...
