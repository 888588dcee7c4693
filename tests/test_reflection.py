"""The router can be explored and driven by reflection alone, as grpcurl does:
no generated stubs on the client side."""

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

SERVICE = "expertmesh.v1.InferenceService"


class ReflectionClient:
    """``grpcurl -plaintext ADDRESS list | describe | call`` in a few lines."""

    def __init__(self, channel: grpc.Channel):
        self.channel = channel
        self.database = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self.database)

    def list(self) -> list[str]:
        return list(self.database.get_services())

    def describe(self, service: str) -> dict:
        return {m.name: m for m in self.pool.FindServiceByName(service).methods}

    def call(self, service: str, method: str, request: dict, timeout: float = 60):
        m = self.describe(service)[method]
        request_class = message_factory.GetMessageClass(m.input_type)
        response_class = message_factory.GetMessageClass(m.output_type)
        make = self.channel.unary_stream if m.server_streaming else self.channel.unary_unary
        rpc = make(f"/{service}/{method}", request_serializer=request_class.SerializeToString,
                   response_deserializer=response_class.FromString)
        result = rpc(json_format.ParseDict(request, request_class()), timeout=timeout)
        if m.server_streaming:
            return [json_format.MessageToDict(r) for r in result]
        return json_format.MessageToDict(result)


@pytest.fixture(scope="module")
def reflect(live_router):
    with grpc.insecure_channel(f"127.0.0.1:{live_router.port}") as channel:
        yield ReflectionClient(channel)


def test_list_shows_the_inference_health_and_reflection_services(reflect):
    assert set(reflect.list()) == {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


def test_describe_shows_the_methods_and_their_json_fields(reflect):
    methods = reflect.describe(SERVICE)
    assert set(methods) == {"Generate", "Chat", "GetCluster", "GetStats"}
    assert methods["Generate"].server_streaming and methods["Chat"].server_streaming
    assert not methods["GetCluster"].server_streaming
    fields = {f.name for f in methods["Generate"].input_type.fields}
    assert {"prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop"} <= fields
    assert methods["Chat"].input_type.fields_by_name["messages"].message_type.full_name == "expertmesh.v1.ChatMessage"


def test_get_cluster_and_generate_by_name(reflect, live_router):
    cluster = reflect.call(SERVICE, "GetCluster", {})
    assert cluster["modelId"] == live_router.checkpoint.model_id
    assert [n["state"] for n in cluster["nodes"]] == ["READY", "READY"]
    replies = reflect.call(SERVICE, "Generate", {"prompt": "Hello", "max_tokens": 8})
    assert len(replies) == 8 and replies[-1]["finishReason"] == "length"
    assert replies[-1]["generationTokens"] == 8
    chat = reflect.call(SERVICE, "Chat", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                                          "chat_template_kwargs": {"enable_thinking": False}})
    assert len(chat) == 4
    stats = reflect.call(SERVICE, "GetStats", {})
    assert [n["name"] for n in stats["nodes"]] == ["n0", "n1"]
    assert int(stats["tokensGenerated"]) >= 12 and 0 < stats["balanceRatio"] <= 1
