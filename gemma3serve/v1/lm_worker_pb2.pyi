from gemma3serve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageInput(_message.Message):
    __slots__ = ("key", "inline", "num_crops", "data")
    KEY_FIELD_NUMBER: _ClassVar[int]
    INLINE_FIELD_NUMBER: _ClassVar[int]
    NUM_CROPS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    key: str
    inline: _common_pb2.Tensor
    num_crops: int
    data: bytes
    def __init__(self, key: _Optional[str] = ..., inline: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., num_crops: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class LMGenerateRequest(_message.Message):
    __slots__ = ("request_id", "chat", "raw", "images", "sampling", "pan_and_scan")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PAN_AND_SCAN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    chat: _common_pb2.Chat
    raw: _common_pb2.RawPrompt
    images: _containers.RepeatedCompositeFieldContainer[ImageInput]
    sampling: _common_pb2.SamplingParams
    pan_and_scan: bool
    def __init__(self, request_id: _Optional[str] = ..., chat: _Optional[_Union[_common_pb2.Chat, _Mapping]] = ..., raw: _Optional[_Union[_common_pb2.RawPrompt, _Mapping]] = ..., images: _Optional[_Iterable[_Union[ImageInput, _Mapping]]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., pan_and_scan: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LMWorkerStats(_message.Message):
    __slots__ = ("num_slots", "active_slots", "queued", "finished", "kept_prefixes", "prompt_tokens", "cached_prompt_tokens")
    class FinishedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NUM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    KEPT_PREFIXES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    num_slots: int
    active_slots: int
    queued: int
    finished: _containers.ScalarMap[str, int]
    kept_prefixes: int
    prompt_tokens: int
    cached_prompt_tokens: int
    def __init__(self, num_slots: _Optional[int] = ..., active_slots: _Optional[int] = ..., queued: _Optional[int] = ..., finished: _Optional[_Mapping[str, int]] = ..., kept_prefixes: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ...) -> None: ...
