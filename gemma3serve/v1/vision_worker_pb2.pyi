from gemma3serve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EmbedImagesRequest(_message.Message):
    __slots__ = ("request_id", "images", "pan_and_scan")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PAN_AND_SCAN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    images: _containers.RepeatedScalarFieldContainer[bytes]
    pan_and_scan: bool
    def __init__(self, request_id: _Optional[str] = ..., images: _Optional[_Iterable[bytes]] = ..., pan_and_scan: _Optional[bool] = ...) -> None: ...

class ImageEmbedding(_message.Message):
    __slots__ = ("key", "cache_hit", "inline", "num_crops")
    KEY_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    INLINE_FIELD_NUMBER: _ClassVar[int]
    NUM_CROPS_FIELD_NUMBER: _ClassVar[int]
    key: str
    cache_hit: bool
    inline: _common_pb2.Tensor
    num_crops: int
    def __init__(self, key: _Optional[str] = ..., cache_hit: _Optional[bool] = ..., inline: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., num_crops: _Optional[int] = ...) -> None: ...

class EmbedImagesResponse(_message.Message):
    __slots__ = ("embeddings",)
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[ImageEmbedding]
    def __init__(self, embeddings: _Optional[_Iterable[_Union[ImageEmbedding, _Mapping]]] = ...) -> None: ...
