from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT32: _ClassVar[DType]

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    IDLE: _ClassVar[NodeState]
    LOADING: _ClassVar[NodeState]
    READY: _ClassVar[NodeState]
    DOWN: _ClassVar[NodeState]

class RebalancePhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REBALANCE_PHASE_UNSPECIFIED: _ClassVar[RebalancePhase]
    REBALANCE_PLANNED: _ClassVar[RebalancePhase]
    REBALANCE_LOADING: _ClassVar[RebalancePhase]
    REBALANCE_SWITCHED: _ClassVar[RebalancePhase]
    REBALANCE_DROPPING: _ClassVar[RebalancePhase]
    REBALANCE_DONE: _ClassVar[RebalancePhase]
    REBALANCE_SKIPPED: _ClassVar[RebalancePhase]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
INT32: DType
NODE_STATE_UNSPECIFIED: NodeState
IDLE: NodeState
LOADING: NodeState
READY: NodeState
DOWN: NodeState
REBALANCE_PHASE_UNSPECIFIED: RebalancePhase
REBALANCE_PLANNED: RebalancePhase
REBALANCE_LOADING: RebalancePhase
REBALANCE_SWITCHED: RebalancePhase
REBALANCE_DROPPING: RebalancePhase
REBALANCE_DONE: RebalancePhase
REBALANCE_SKIPPED: RebalancePhase

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class LayerExperts(_message.Message):
    __slots__ = ("layer", "experts")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    experts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., experts: _Optional[_Iterable[int]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("name", "version", "protocol_version", "model_id", "config_hash", "memory_budget_bytes", "memory_used_bytes", "state", "held", "data_port", "token_required", "stages", "kv_cache_bytes", "kv_sequences", "router", "epoch", "weights_hash")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_HASH_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    protocol_version: int
    model_id: str
    config_hash: str
    memory_budget_bytes: int
    memory_used_bytes: int
    state: NodeState
    held: _containers.RepeatedCompositeFieldContainer[LayerExperts]
    data_port: int
    token_required: bool
    stages: _containers.RepeatedCompositeFieldContainer[LayerSpan]
    kv_cache_bytes: int
    kv_sequences: int
    router: RouterIdentity
    epoch: int
    weights_hash: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., protocol_version: _Optional[int] = ..., model_id: _Optional[str] = ..., config_hash: _Optional[str] = ..., memory_budget_bytes: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., state: _Optional[_Union[NodeState, str]] = ..., held: _Optional[_Iterable[_Union[LayerExperts, _Mapping]]] = ..., data_port: _Optional[int] = ..., token_required: _Optional[bool] = ..., stages: _Optional[_Iterable[_Union[LayerSpan, _Mapping]]] = ..., kv_cache_bytes: _Optional[int] = ..., kv_sequences: _Optional[int] = ..., router: _Optional[_Union[RouterIdentity, _Mapping]] = ..., epoch: _Optional[int] = ..., weights_hash: _Optional[str] = ...) -> None: ...

class LayerSpan(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class AssignStagesRequest(_message.Message):
    __slots__ = ("config_hash", "stages", "router", "weights_hash")
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_HASH_FIELD_NUMBER: _ClassVar[int]
    config_hash: str
    stages: _containers.RepeatedCompositeFieldContainer[LayerSpan]
    router: RouterIdentity
    weights_hash: str
    def __init__(self, config_hash: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[LayerSpan, _Mapping]]] = ..., router: _Optional[_Union[RouterIdentity, _Mapping]] = ..., weights_hash: _Optional[str] = ...) -> None: ...

class RouterIdentity(_message.Message):
    __slots__ = ("id", "address", "takeover")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TAKEOVER_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    takeover: bool
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., takeover: _Optional[bool] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("router_id", "epoch")
    ROUTER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    router_id: str
    epoch: int
    def __init__(self, router_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MeasureRequest(_message.Message):
    __slots__ = ("layer", "context", "router")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    layer: int
    context: int
    router: RouterIdentity
    def __init__(self, layer: _Optional[int] = ..., context: _Optional[int] = ..., router: _Optional[_Union[RouterIdentity, _Mapping]] = ...) -> None: ...

class Measurement(_message.Message):
    __slots__ = ("layer_seconds_batch1", "layer_seconds_batch8", "layer_bytes", "epoch")
    LAYER_SECONDS_BATCH1_FIELD_NUMBER: _ClassVar[int]
    LAYER_SECONDS_BATCH8_FIELD_NUMBER: _ClassVar[int]
    LAYER_BYTES_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    layer_seconds_batch1: float
    layer_seconds_batch8: float
    layer_bytes: int
    epoch: int
    def __init__(self, layer_seconds_batch1: _Optional[float] = ..., layer_seconds_batch8: _Optional[float] = ..., layer_bytes: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class AssignRequest(_message.Message):
    __slots__ = ("config_hash", "experts", "router", "weights_hash")
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_HASH_FIELD_NUMBER: _ClassVar[int]
    config_hash: str
    experts: _containers.RepeatedCompositeFieldContainer[LayerExperts]
    router: RouterIdentity
    weights_hash: str
    def __init__(self, config_hash: _Optional[str] = ..., experts: _Optional[_Iterable[_Union[LayerExperts, _Mapping]]] = ..., router: _Optional[_Union[RouterIdentity, _Mapping]] = ..., weights_hash: _Optional[str] = ...) -> None: ...

class AssignProgress(_message.Message):
    __slots__ = ("loaded_bytes", "total_bytes", "layers_done", "layers_total", "done", "epoch")
    LOADED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAYERS_DONE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    loaded_bytes: int
    total_bytes: int
    layers_done: int
    layers_total: int
    done: bool
    epoch: int
    def __init__(self, loaded_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., layers_done: _Optional[int] = ..., layers_total: _Optional[int] = ..., done: _Optional[bool] = ..., epoch: _Optional[int] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("request_id", "expert", "stage", "release", "ping")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    expert: ExpertRequest
    stage: StageRequest
    release: SequenceRelease
    ping: Ping
    def __init__(self, request_id: _Optional[int] = ..., expert: _Optional[_Union[ExpertRequest, _Mapping]] = ..., stage: _Optional[_Union[StageRequest, _Mapping]] = ..., release: _Optional[_Union[SequenceRelease, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ...) -> None: ...

class ExpertRequest(_message.Message):
    __slots__ = ("layer", "hidden", "expert_ids", "weights")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    hidden: Tensor
    expert_ids: Tensor
    weights: Tensor
    def __init__(self, layer: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., expert_ids: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class StageRequest(_message.Message):
    __slots__ = ("layer", "hidden", "sequences", "right_padding", "trim")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    RIGHT_PADDING_FIELD_NUMBER: _ClassVar[int]
    TRIM_FIELD_NUMBER: _ClassVar[int]
    layer: int
    hidden: Tensor
    sequences: _containers.RepeatedScalarFieldContainer[int]
    right_padding: _containers.RepeatedScalarFieldContainer[int]
    trim: int
    def __init__(self, layer: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., sequences: _Optional[_Iterable[int]] = ..., right_padding: _Optional[_Iterable[int]] = ..., trim: _Optional[int] = ...) -> None: ...

class SequenceRelease(_message.Message):
    __slots__ = ("sequences",)
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, sequences: _Optional[_Iterable[int]] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("request_id", "output", "compute_seconds", "error_code", "error", "working", "routing")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WORKING_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    output: Tensor
    compute_seconds: float
    error_code: int
    error: str
    working: bool
    routing: StageRouting
    def __init__(self, request_id: _Optional[int] = ..., output: _Optional[_Union[Tensor, _Mapping]] = ..., compute_seconds: _Optional[float] = ..., error_code: _Optional[int] = ..., error: _Optional[str] = ..., working: _Optional[bool] = ..., routing: _Optional[_Union[StageRouting, _Mapping]] = ...) -> None: ...

class StageRouting(_message.Message):
    __slots__ = ("slots", "counts")
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedScalarFieldContainer[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, slots: _Optional[_Iterable[int]] = ..., counts: _Optional[_Iterable[int]] = ...) -> None: ...

class DataPlaneHello(_message.Message):
    __slots__ = ("token", "router_id", "epoch")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ROUTER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    token: str
    router_id: str
    epoch: int
    def __init__(self, token: _Optional[str] = ..., router_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStats(_message.Message):
    __slots__ = ("forward_requests", "forward_tokens", "bytes_received", "bytes_sent", "compute_seconds", "prelaunch_answered", "prelaunch_gave_up", "prelaunch_let_go")
    FORWARD_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PRELAUNCH_ANSWERED_FIELD_NUMBER: _ClassVar[int]
    PRELAUNCH_GAVE_UP_FIELD_NUMBER: _ClassVar[int]
    PRELAUNCH_LET_GO_FIELD_NUMBER: _ClassVar[int]
    forward_requests: int
    forward_tokens: int
    bytes_received: int
    bytes_sent: int
    compute_seconds: float
    prelaunch_answered: int
    prelaunch_gave_up: int
    prelaunch_let_go: int
    def __init__(self, forward_requests: _Optional[int] = ..., forward_tokens: _Optional[int] = ..., bytes_received: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., compute_seconds: _Optional[float] = ..., prelaunch_answered: _Optional[int] = ..., prelaunch_gave_up: _Optional[int] = ..., prelaunch_let_go: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_tokens", "temperature", "top_p", "seed", "top_k", "min_p", "repetition_penalty", "repetition_context_size", "stop")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_CONTEXT_SIZE_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    top_k: int
    min_p: float
    repetition_penalty: float
    repetition_context_size: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[str] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., repetition_context_size: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatRequest(_message.Message):
    __slots__ = ("messages", "max_tokens", "temperature", "top_p", "seed", "top_k", "min_p", "repetition_penalty", "repetition_context_size", "stop", "chat_template_kwargs")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_CONTEXT_SIZE_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_KWARGS_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    top_k: int
    min_p: float
    repetition_penalty: float
    repetition_context_size: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    chat_template_kwargs: _struct_pb2.Struct
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., repetition_context_size: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., chat_template_kwargs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token", "finish_reason", "prompt_tokens", "generation_tokens", "generation_tps")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TPS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token: int
    finish_reason: str
    prompt_tokens: int
    generation_tokens: int
    generation_tps: float
    def __init__(self, text: _Optional[str] = ..., token: _Optional[int] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., generation_tokens: _Optional[int] = ..., generation_tps: _Optional[float] = ...) -> None: ...

class GetClusterRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("name", "address", "state", "memory_budget_bytes", "memory_used_bytes", "experts", "error", "stages")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    state: NodeState
    memory_budget_bytes: int
    memory_used_bytes: int
    experts: _containers.RepeatedCompositeFieldContainer[LayerExperts]
    error: str
    stages: _containers.RepeatedCompositeFieldContainer[LayerSpan]
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ..., memory_budget_bytes: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., experts: _Optional[_Iterable[_Union[LayerExperts, _Mapping]]] = ..., error: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[LayerSpan, _Mapping]]] = ...) -> None: ...

class ClusterInfo(_message.Message):
    __slots__ = ("model_id", "config_hash", "num_experts", "moe_layers", "nodes")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    MOE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    config_hash: str
    num_experts: int
    moe_layers: _containers.RepeatedScalarFieldContainer[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    def __init__(self, model_id: _Optional[str] = ..., config_hash: _Optional[str] = ..., num_experts: _Optional[int] = ..., moe_layers: _Optional[_Iterable[int]] = ..., nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ...) -> None: ...

class RouterStatsRequest(_message.Message):
    __slots__ = ("reset",)
    RESET_FIELD_NUMBER: _ClassVar[int]
    reset: bool
    def __init__(self, reset: _Optional[bool] = ...) -> None: ...

class Histogram(_message.Message):
    __slots__ = ("bounds", "counts", "sum", "count")
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    bounds: _containers.RepeatedScalarFieldContainer[float]
    counts: _containers.RepeatedScalarFieldContainer[int]
    sum: float
    count: int
    def __init__(self, bounds: _Optional[_Iterable[float]] = ..., counts: _Optional[_Iterable[int]] = ..., sum: _Optional[float] = ..., count: _Optional[int] = ...) -> None: ...

class LayerLoad(_message.Message):
    __slots__ = ("layer", "expert_tokens", "node_tokens", "tokens")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert_tokens: _containers.RepeatedScalarFieldContainer[int]
    node_tokens: _containers.RepeatedScalarFieldContainer[int]
    tokens: int
    def __init__(self, layer: _Optional[int] = ..., expert_tokens: _Optional[_Iterable[int]] = ..., node_tokens: _Optional[_Iterable[int]] = ..., tokens: _Optional[int] = ...) -> None: ...

class NodeTraffic(_message.Message):
    __slots__ = ("name", "tokens", "requests", "bytes_sent", "bytes_received", "rtt_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    RTT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    tokens: int
    requests: int
    bytes_sent: int
    bytes_received: int
    rtt_seconds: Histogram
    def __init__(self, name: _Optional[str] = ..., tokens: _Optional[int] = ..., requests: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., rtt_seconds: _Optional[_Union[Histogram, _Mapping]] = ...) -> None: ...

class RouterStats(_message.Message):
    __slots__ = ("seconds", "num_experts", "top_k", "layers", "nodes", "tokens_processed", "tokens_generated", "requests", "balance_ratio", "bytes_per_token", "ttft_seconds", "round_trips")
    class RequestsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BALANCE_RATIO_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TTFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROUND_TRIPS_FIELD_NUMBER: _ClassVar[int]
    seconds: float
    num_experts: int
    top_k: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerLoad]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeTraffic]
    tokens_processed: int
    tokens_generated: int
    requests: _containers.ScalarMap[str, int]
    balance_ratio: float
    bytes_per_token: float
    ttft_seconds: Histogram
    round_trips: int
    def __init__(self, seconds: _Optional[float] = ..., num_experts: _Optional[int] = ..., top_k: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerLoad, _Mapping]]] = ..., nodes: _Optional[_Iterable[_Union[NodeTraffic, _Mapping]]] = ..., tokens_processed: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., requests: _Optional[_Mapping[str, int]] = ..., balance_ratio: _Optional[float] = ..., bytes_per_token: _Optional[float] = ..., ttft_seconds: _Optional[_Union[Histogram, _Mapping]] = ..., round_trips: _Optional[int] = ...) -> None: ...

class RebalanceRequest(_message.Message):
    __slots__ = ("dry_run", "threshold", "min_tokens")
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    threshold: float
    min_tokens: int
    def __init__(self, dry_run: _Optional[bool] = ..., threshold: _Optional[float] = ..., min_tokens: _Optional[int] = ...) -> None: ...

class ExpertMove(_message.Message):
    __slots__ = ("layer", "expert", "before", "after")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    before: _containers.RepeatedScalarFieldContainer[str]
    after: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., before: _Optional[_Iterable[str]] = ..., after: _Optional[_Iterable[str]] = ...) -> None: ...

class RebalanceProgress(_message.Message):
    __slots__ = ("phase", "balance_before", "balance_planned", "moves", "node", "loaded_bytes", "total_bytes", "message", "round")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    BALANCE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BALANCE_PLANNED_FIELD_NUMBER: _ClassVar[int]
    MOVES_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    LOADED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    phase: RebalancePhase
    balance_before: float
    balance_planned: float
    moves: _containers.RepeatedCompositeFieldContainer[ExpertMove]
    node: str
    loaded_bytes: int
    total_bytes: int
    message: str
    round: int
    def __init__(self, phase: _Optional[_Union[RebalancePhase, str]] = ..., balance_before: _Optional[float] = ..., balance_planned: _Optional[float] = ..., moves: _Optional[_Iterable[_Union[ExpertMove, _Mapping]]] = ..., node: _Optional[str] = ..., loaded_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., message: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...
