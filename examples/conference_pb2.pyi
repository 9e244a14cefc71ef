from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class PingRequest(_message.Message):
    __slots__ = ("payload", "delay_ms")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    payload: str
    delay_ms: int
    def __init__(self, payload: _Optional[str] = ..., delay_ms: _Optional[int] = ...) -> None: ...

class PingReply(_message.Message):
    __slots__ = ("backend", "payload")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    backend: str
    payload: str
    def __init__(self, backend: _Optional[str] = ..., payload: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("session_id", "duration_ms", "frame_interval_ms")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    FRAME_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    duration_ms: int
    frame_interval_ms: int
    def __init__(self, session_id: _Optional[str] = ..., duration_ms: _Optional[int] = ..., frame_interval_ms: _Optional[int] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("session_id", "seq", "backend")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seq: int
    backend: str
    def __init__(self, session_id: _Optional[str] = ..., seq: _Optional[int] = ..., backend: _Optional[str] = ...) -> None: ...

class UploadSummary(_message.Message):
    __slots__ = ("frames", "backend")
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    frames: int
    backend: str
    def __init__(self, frames: _Optional[int] = ..., backend: _Optional[str] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("text", "backend")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    text: str
    backend: str
    def __init__(self, text: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...
