from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_FORMAT_UNSPECIFIED: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_PNG: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_RAW_FLOAT32: _ClassVar[OutputFormat]

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    MODEL_KIND_CLASS_CONDITIONAL: _ClassVar[ModelKind]
    MODEL_KIND_TEXT_TO_IMAGE: _ClassVar[ModelKind]
OUTPUT_FORMAT_UNSPECIFIED: OutputFormat
OUTPUT_FORMAT_PNG: OutputFormat
OUTPUT_FORMAT_RAW_FLOAT32: OutputFormat
MODEL_KIND_UNSPECIFIED: ModelKind
MODEL_KIND_CLASS_CONDITIONAL: ModelKind
MODEL_KIND_TEXT_TO_IMAGE: ModelKind

class GenerateRequest(_message.Message):
    __slots__ = ("model", "solver", "solver_params", "steps", "nfe", "schedule", "schedule_params", "afs", "num_samples", "seeds", "base_seed", "labels", "guidance", "output_format", "request_id", "preview_every", "prompt", "negative_prompt", "width", "height", "init_image", "strength")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOLVER_FIELD_NUMBER: _ClassVar[int]
    SOLVER_PARAMS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    NFE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_PARAMS_FIELD_NUMBER: _ClassVar[int]
    AFS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    BASE_SEED_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    model: str
    solver: str
    solver_params: _struct_pb2.Struct
    steps: int
    nfe: int
    schedule: str
    schedule_params: _struct_pb2.Struct
    afs: bool
    num_samples: int
    seeds: _containers.RepeatedScalarFieldContainer[int]
    base_seed: int
    labels: _containers.RepeatedScalarFieldContainer[int]
    guidance: _containers.RepeatedScalarFieldContainer[float]
    output_format: OutputFormat
    request_id: str
    preview_every: int
    prompt: _containers.RepeatedScalarFieldContainer[str]
    negative_prompt: _containers.RepeatedScalarFieldContainer[str]
    width: int
    height: int
    init_image: bytes
    strength: float
    def __init__(self, model: _Optional[str] = ..., solver: _Optional[str] = ..., solver_params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., steps: _Optional[int] = ..., nfe: _Optional[int] = ..., schedule: _Optional[str] = ..., schedule_params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., afs: _Optional[bool] = ..., num_samples: _Optional[int] = ..., seeds: _Optional[_Iterable[int]] = ..., base_seed: _Optional[int] = ..., labels: _Optional[_Iterable[int]] = ..., guidance: _Optional[_Iterable[float]] = ..., output_format: _Optional[_Union[OutputFormat, str]] = ..., request_id: _Optional[str] = ..., preview_every: _Optional[int] = ..., prompt: _Optional[_Iterable[str]] = ..., negative_prompt: _Optional[_Iterable[str]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., init_image: _Optional[bytes] = ..., strength: _Optional[float] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("accepted", "progress", "result", "request_id")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    accepted: PlanResponse
    progress: Progress
    result: SampleResult
    request_id: str
    def __init__(self, accepted: _Optional[_Union[PlanResponse, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[SampleResult, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total", "sigma", "previews")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    PREVIEWS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total: int
    sigma: float
    previews: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, step: _Optional[int] = ..., total: _Optional[int] = ..., sigma: _Optional[float] = ..., previews: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("format", "data", "channels", "height", "width")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    format: OutputFormat
    data: bytes
    channels: int
    height: int
    width: int
    def __init__(self, format: _Optional[_Union[OutputFormat, str]] = ..., data: _Optional[bytes] = ..., channels: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_seconds", "sampling_seconds", "total_seconds", "batch_rows")
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    queue_seconds: float
    sampling_seconds: float
    total_seconds: float
    batch_rows: int
    def __init__(self, queue_seconds: _Optional[float] = ..., sampling_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ..., batch_rows: _Optional[int] = ...) -> None: ...

class SampleResult(_message.Message):
    __slots__ = ("index", "seed", "label", "guidance", "nfe", "network_evals", "sigmas", "timing", "image", "request_id", "dropped_tokens")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    NFE_FIELD_NUMBER: _ClassVar[int]
    NETWORK_EVALS_FIELD_NUMBER: _ClassVar[int]
    SIGMAS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    index: int
    seed: int
    label: int
    guidance: float
    nfe: int
    network_evals: int
    sigmas: _containers.RepeatedScalarFieldContainer[float]
    timing: Timing
    image: Image
    request_id: str
    dropped_tokens: int
    def __init__(self, index: _Optional[int] = ..., seed: _Optional[int] = ..., label: _Optional[int] = ..., guidance: _Optional[float] = ..., nfe: _Optional[int] = ..., network_evals: _Optional[int] = ..., sigmas: _Optional[_Iterable[float]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., request_id: _Optional[str] = ..., dropped_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("results", "plan", "request_id")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SampleResult]
    plan: PlanResponse
    request_id: str
    def __init__(self, results: _Optional[_Iterable[_Union[SampleResult, _Mapping]]] = ..., plan: _Optional[_Union[PlanResponse, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class PredictorStatus(_message.Message):
    __slots__ = ("required", "available", "key", "train_command")
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    TRAIN_COMMAND_FIELD_NUMBER: _ClassVar[int]
    required: bool
    available: bool
    key: str
    train_command: str
    def __init__(self, required: _Optional[bool] = ..., available: _Optional[bool] = ..., key: _Optional[str] = ..., train_command: _Optional[str] = ...) -> None: ...

class PlanResponse(_message.Message):
    __slots__ = ("model", "solver", "schedule", "steps", "nfe", "network_evals", "sigmas", "reachable_nfe", "predictor", "num_samples", "seeds", "latent_shape", "width", "height", "start_step", "dropped_tokens")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOLVER_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    NFE_FIELD_NUMBER: _ClassVar[int]
    NETWORK_EVALS_FIELD_NUMBER: _ClassVar[int]
    SIGMAS_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_NFE_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    LATENT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model: str
    solver: str
    schedule: str
    steps: int
    nfe: int
    network_evals: int
    sigmas: _containers.RepeatedScalarFieldContainer[float]
    reachable_nfe: _containers.RepeatedScalarFieldContainer[int]
    predictor: PredictorStatus
    num_samples: int
    seeds: _containers.RepeatedScalarFieldContainer[int]
    latent_shape: _containers.RepeatedScalarFieldContainer[int]
    width: int
    height: int
    start_step: int
    dropped_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., solver: _Optional[str] = ..., schedule: _Optional[str] = ..., steps: _Optional[int] = ..., nfe: _Optional[int] = ..., network_evals: _Optional[int] = ..., sigmas: _Optional[_Iterable[float]] = ..., reachable_nfe: _Optional[_Iterable[int]] = ..., predictor: _Optional[_Union[PredictorStatus, _Mapping]] = ..., num_samples: _Optional[int] = ..., seeds: _Optional[_Iterable[int]] = ..., latent_shape: _Optional[_Iterable[int]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., start_step: _Optional[int] = ..., dropped_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "description", "ready", "channels", "height", "width", "num_labels", "label_names", "null_class", "sigma_min", "sigma_max", "prediction_type", "device", "dtype", "fingerprint", "kind", "latent_shape", "size_multiple", "max_prompt_tokens", "pipeline_class", "guidance_distilled")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    NUM_LABELS_FIELD_NUMBER: _ClassVar[int]
    LABEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    NULL_CLASS_FIELD_NUMBER: _ClassVar[int]
    SIGMA_MIN_FIELD_NUMBER: _ClassVar[int]
    SIGMA_MAX_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_TYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LATENT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_CLASS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_DISTILLED_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    ready: bool
    channels: int
    height: int
    width: int
    num_labels: int
    label_names: _containers.RepeatedScalarFieldContainer[str]
    null_class: int
    sigma_min: float
    sigma_max: float
    prediction_type: str
    device: str
    dtype: str
    fingerprint: str
    kind: ModelKind
    latent_shape: _containers.RepeatedScalarFieldContainer[int]
    size_multiple: int
    max_prompt_tokens: int
    pipeline_class: str
    guidance_distilled: bool
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., ready: _Optional[bool] = ..., channels: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., num_labels: _Optional[int] = ..., label_names: _Optional[_Iterable[str]] = ..., null_class: _Optional[int] = ..., sigma_min: _Optional[float] = ..., sigma_max: _Optional[float] = ..., prediction_type: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., fingerprint: _Optional[str] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., latent_shape: _Optional[_Iterable[int]] = ..., size_multiple: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ..., pipeline_class: _Optional[str] = ..., guidance_distilled: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class ListSolversRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SolverInfo(_message.Message):
    __slots__ = ("name", "description", "order", "parameter_schema_json", "evals_per_step", "min_steps", "reachable_nfe", "reachable_nfe_afs", "needs_predictor", "predictors")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    EVALS_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    MIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_NFE_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_NFE_AFS_FIELD_NUMBER: _ClassVar[int]
    NEEDS_PREDICTOR_FIELD_NUMBER: _ClassVar[int]
    PREDICTORS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    order: int
    parameter_schema_json: str
    evals_per_step: int
    min_steps: int
    reachable_nfe: _containers.RepeatedScalarFieldContainer[int]
    reachable_nfe_afs: _containers.RepeatedScalarFieldContainer[int]
    needs_predictor: bool
    predictors: _containers.RepeatedCompositeFieldContainer[PredictorAvailability]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., order: _Optional[int] = ..., parameter_schema_json: _Optional[str] = ..., evals_per_step: _Optional[int] = ..., min_steps: _Optional[int] = ..., reachable_nfe: _Optional[_Iterable[int]] = ..., reachable_nfe_afs: _Optional[_Iterable[int]] = ..., needs_predictor: _Optional[bool] = ..., predictors: _Optional[_Iterable[_Union[PredictorAvailability, _Mapping]]] = ...) -> None: ...

class PredictorAvailability(_message.Message):
    __slots__ = ("model", "nfe", "keys")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NFE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    model: str
    nfe: _containers.RepeatedScalarFieldContainer[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., nfe: _Optional[_Iterable[int]] = ..., keys: _Optional[_Iterable[str]] = ...) -> None: ...

class ListSolversResponse(_message.Message):
    __slots__ = ("solvers",)
    SOLVERS_FIELD_NUMBER: _ClassVar[int]
    solvers: _containers.RepeatedCompositeFieldContainer[SolverInfo]
    def __init__(self, solvers: _Optional[_Iterable[_Union[SolverInfo, _Mapping]]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("api_version", "server_version", "max_samples_per_request", "max_steps", "min_guidance", "max_guidance", "max_message_bytes", "max_batch_size", "max_queue_delay_ms", "max_queued_requests", "auth_required", "max_prompt_chars", "min_image_side", "max_image_side", "max_image_pixels", "batching_mode")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    MAX_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    AUTH_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MIN_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    BATCHING_MODE_FIELD_NUMBER: _ClassVar[int]
    api_version: str
    server_version: str
    max_samples_per_request: int
    max_steps: int
    min_guidance: float
    max_guidance: float
    max_message_bytes: int
    max_batch_size: int
    max_queue_delay_ms: float
    max_queued_requests: int
    auth_required: bool
    max_prompt_chars: int
    min_image_side: int
    max_image_side: int
    max_image_pixels: int
    batching_mode: str
    def __init__(self, api_version: _Optional[str] = ..., server_version: _Optional[str] = ..., max_samples_per_request: _Optional[int] = ..., max_steps: _Optional[int] = ..., min_guidance: _Optional[float] = ..., max_guidance: _Optional[float] = ..., max_message_bytes: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_queue_delay_ms: _Optional[float] = ..., max_queued_requests: _Optional[int] = ..., auth_required: _Optional[bool] = ..., max_prompt_chars: _Optional[int] = ..., min_image_side: _Optional[int] = ..., max_image_side: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., batching_mode: _Optional[str] = ...) -> None: ...
