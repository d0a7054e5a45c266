from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ArrayRef(_message.Message):
    __slots__ = ("offset", "shape", "dtype", "encoding", "nbytes")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    offset: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    encoding: str
    nbytes: int
    def __init__(self, offset: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., encoding: _Optional[str] = ..., nbytes: _Optional[int] = ...) -> None: ...

class OutputRegion(_message.Message):
    __slots__ = ("output", "shm_key", "offset", "byte_size")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SHM_KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    output: str
    shm_key: str
    offset: int
    byte_size: int
    def __init__(self, output: _Optional[str] = ..., shm_key: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("id", "ring", "slot", "generation", "color", "depth", "has_depth", "score_threshold", "mask_format", "deadline", "received_at", "dispatched_at", "decode_us", "request_id", "model", "protocol", "outputs", "model_version", "output_regions")
    ID_FIELD_NUMBER: _ClassVar[int]
    RING_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    COLOR_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    HAS_DEPTH_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MASK_FORMAT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    DISPATCHED_AT_FIELD_NUMBER: _ClassVar[int]
    DECODE_US_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_REGIONS_FIELD_NUMBER: _ClassVar[int]
    id: int
    ring: str
    slot: int
    generation: int
    color: ArrayRef
    depth: ArrayRef
    has_depth: bool
    score_threshold: float
    mask_format: int
    deadline: float
    received_at: float
    dispatched_at: float
    decode_us: int
    request_id: str
    model: str
    protocol: str
    outputs: _containers.RepeatedScalarFieldContainer[str]
    model_version: str
    output_regions: _containers.RepeatedCompositeFieldContainer[OutputRegion]
    def __init__(self, id: _Optional[int] = ..., ring: _Optional[str] = ..., slot: _Optional[int] = ..., generation: _Optional[int] = ..., color: _Optional[_Union[ArrayRef, _Mapping]] = ..., depth: _Optional[_Union[ArrayRef, _Mapping]] = ..., has_depth: bool = ..., score_threshold: _Optional[float] = ..., mask_format: _Optional[int] = ..., deadline: _Optional[float] = ..., received_at: _Optional[float] = ..., dispatched_at: _Optional[float] = ..., decode_us: _Optional[int] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ..., protocol: _Optional[str] = ..., outputs: _Optional[_Iterable[str]] = ..., model_version: _Optional[str] = ..., output_regions: _Optional[_Iterable[_Union[OutputRegion, _Mapping]]] = ...) -> None: ...

class InferReply(_message.Message):
    __slots__ = ("id", "code", "message", "queue_us", "decode_us", "inference_us", "encode_us", "batch_size", "accepted_at", "batch_started_at", "replied_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    DECODE_US_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_US_FIELD_NUMBER: _ClassVar[int]
    ENCODE_US_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_AT_FIELD_NUMBER: _ClassVar[int]
    BATCH_STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    REPLIED_AT_FIELD_NUMBER: _ClassVar[int]
    id: int
    code: str
    message: str
    queue_us: int
    decode_us: int
    inference_us: int
    encode_us: int
    batch_size: int
    accepted_at: float
    batch_started_at: float
    replied_at: float
    def __init__(self, id: _Optional[int] = ..., code: _Optional[str] = ..., message: _Optional[str] = ..., queue_us: _Optional[int] = ..., decode_us: _Optional[int] = ..., inference_us: _Optional[int] = ..., encode_us: _Optional[int] = ..., batch_size: _Optional[int] = ..., accepted_at: _Optional[float] = ..., batch_started_at: _Optional[float] = ..., replied_at: _Optional[float] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("sent_at", "ring", "reply_to")
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    RING_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    sent_at: float
    ring: str
    reply_to: str
    def __init__(self, sent_at: _Optional[float] = ..., ring: _Optional[str] = ..., reply_to: _Optional[str] = ...) -> None: ...

class Pong(_message.Message):
    __slots__ = ("sent_at", "incarnation", "pid", "ready", "engine", "device", "error", "gpu_jpeg", "gpu_png_rows")
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    GPU_JPEG_FIELD_NUMBER: _ClassVar[int]
    GPU_PNG_ROWS_FIELD_NUMBER: _ClassVar[int]
    sent_at: float
    incarnation: str
    pid: int
    ready: bool
    engine: str
    device: str
    error: str
    gpu_jpeg: bool
    gpu_png_rows: bool
    def __init__(self, sent_at: _Optional[float] = ..., incarnation: _Optional[str] = ..., pid: _Optional[int] = ..., ready: bool = ..., engine: _Optional[str] = ..., device: _Optional[str] = ..., error: _Optional[str] = ..., gpu_jpeg: bool = ..., gpu_png_rows: bool = ...) -> None: ...
