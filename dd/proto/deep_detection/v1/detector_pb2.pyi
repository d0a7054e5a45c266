from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    UINT16: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]

class MaskFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RLE: _ClassVar[MaskFormat]
    NONE: _ClassVar[MaskFormat]
DTYPE_UNSPECIFIED: DType
UINT8: DType
UINT16: DType
FLOAT32: DType
RLE: MaskFormat
NONE: MaskFormat

class Image(_message.Message):
    __slots__ = ("data", "encoding", "shape", "dtype")
    class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ENCODED: _ClassVar[Image.Encoding]
        RAW: _ClassVar[Image.Encoding]
        ZSTD: _ClassVar[Image.Encoding]
    ENCODED: Image.Encoding
    RAW: Image.Encoding
    ZSTD: Image.Encoding
    DATA_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    encoding: Image.Encoding
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, data: _Optional[bytes] = ..., encoding: _Optional[_Union[Image.Encoding, str]] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class DetectRequest(_message.Message):
    __slots__ = ("model", "color", "depth", "score_threshold", "mask_format", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    COLOR_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MASK_FORMAT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    color: Image
    depth: Image
    score_threshold: float
    mask_format: MaskFormat
    request_id: str
    def __init__(self, model: _Optional[str] = ..., color: _Optional[_Union[Image, _Mapping]] = ..., depth: _Optional[_Union[Image, _Mapping]] = ..., score_threshold: _Optional[float] = ..., mask_format: _Optional[_Union[MaskFormat, str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ...) -> None: ...

class Mask(_message.Message):
    __slots__ = ("format", "height", "width", "counts")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    format: MaskFormat
    height: int
    width: int
    counts: bytes
    def __init__(self, format: _Optional[_Union[MaskFormat, str]] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., counts: _Optional[bytes] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("class_id", "class_name", "score", "box", "mask")
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    class_id: int
    class_name: str
    score: float
    box: Box
    mask: Mask
    def __init__(self, class_id: _Optional[int] = ..., class_name: _Optional[str] = ..., score: _Optional[float] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., mask: _Optional[_Union[Mask, _Mapping]] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queued_us", "decode_us", "inference_us", "postprocess_us", "total_us", "batch_size")
    QUEUED_US_FIELD_NUMBER: _ClassVar[int]
    DECODE_US_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_US_FIELD_NUMBER: _ClassVar[int]
    POSTPROCESS_US_FIELD_NUMBER: _ClassVar[int]
    TOTAL_US_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    queued_us: int
    decode_us: int
    inference_us: int
    postprocess_us: int
    total_us: int
    batch_size: int
    def __init__(self, queued_us: _Optional[int] = ..., decode_us: _Optional[int] = ..., inference_us: _Optional[int] = ..., postprocess_us: _Optional[int] = ..., total_us: _Optional[int] = ..., batch_size: _Optional[int] = ...) -> None: ...

class DetectResponse(_message.Message):
    __slots__ = ("request_id", "model", "height", "width", "instances", "timing", "worker", "error_code", "error_message")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    height: int
    width: int
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    timing: Timing
    worker: str
    error_code: int
    error_message: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., worker: _Optional[str] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "input_kind", "categories", "engine", "ready", "max_batch_size", "ready_workers", "is_default", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    READY_WORKERS_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    input_kind: str
    categories: _containers.RepeatedScalarFieldContainer[str]
    engine: str
    ready: bool
    max_batch_size: int
    ready_workers: int
    is_default: bool
    error: str
    def __init__(self, name: _Optional[str] = ..., input_kind: _Optional[str] = ..., categories: _Optional[_Iterable[str]] = ..., engine: _Optional[str] = ..., ready: bool = ..., max_batch_size: _Optional[int] = ..., ready_workers: _Optional[int] = ..., is_default: bool = ..., error: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
