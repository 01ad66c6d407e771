"""The OpenAI chat-completions protocol as typed models: what /v1/chat/completions and /v1/models take and give.

Fields of the protocol this server cannot honour (tools, stop sequences, several choices, log-probabilities,
penalties, JSON mode) are refused by name when set, rather than ignored. Everything the /think pipeline adds
lives in one extension object, `so8t`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

FinishReason = Literal["stop", "length", "content_filter"]
Status = Literal["answered", "denied", "refused", "escalated", "withheld"]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A turn: `developer` is read as `system`; content is text or a list of text parts."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=200)  # accepted, not used
    refusal: str | None = None  # what a client keeps of an earlier assistant turn; not used
    tool_calls: list[Any] | None = None  # only empty: this server calls no tools

    @field_validator("tool_calls")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("tool calls are not supported by this server")
        return value

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    @property
    def turn_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False  # one more chunk before [DONE]: empty choices and the usage
    include_obfuscation: bool | None = None  # accepted, not used


_UNSUPPORTED = (
    "stop",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "audio",
    "prediction",
    "web_search_options",
)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="the id GET /v1/models lists")
    messages: list[ChatMessage] = Field(min_length=1, description="ends with a user turn")
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**32)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1, description="one choice per request")
    user: str | None = Field(None, max_length=200)  # accepted, not stored
    response_format: dict[str, Any] | None = Field(None, description='only {"type": "text"}')
    parallel_tool_calls: bool | None = None  # accepted: without tools it changes nothing
    store: bool | None = None  # accepted, not used
    metadata: dict[str, str] | None = None  # accepted, not stored
    service_tier: str | None = None  # accepted, not used
    reasoning_effort: str | None = None  # accepted, not used: the model always thinks first
    stop: str | list[str] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None

    @field_validator(*_UNSUPPORTED)
    @classmethod
    def _not_served(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, False, 0, "", [], {}):
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_out(cls, value: list[str] | None) -> list[str] | None:
        if value not in (None, ["text"]):
            raise ValueError('only ["text"] is supported by this server')
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value != {"type": "text"}:
            raise ValueError('only {"type": "text"} is supported by this server')
        return value

    @model_validator(mode="after")
    def _shape(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give at most one of 'max_tokens' or 'max_completion_tokens'")
        if self.messages[-1].role != "user":
            raise ValueError("the last message must be the user's (this server writes the assistant's next turn)")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens or self.max_completion_tokens


class So8tInfo(BaseModel):
    """The /think pipeline's view of the reply (the extension field; OpenAI clients keep it as an extra)."""

    safety_label: str | None = Field(description="the model's four-class verdict: ALLOW, DENY, REFUSE, ESCALATION")
    escalated: bool
    status: Status
    internal_reasoning_hash: str | None = Field(
        description="HMAC-SHA256 of the thinking under the server secret (links the response to its audit row); "
        "the thinking never leaves the server"
    )
    request_id: str
    detail: str | None = Field(None, description="why a reply was withheld")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int = Field(description="0 when the backend does not count")
    completion_tokens: int = Field(description="every generated token, the thinking's included")
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: None = None
    so8t: So8tInfo


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a stream. The first carries the role, the last with a finish_reason carries `so8t`;
    with stream_options.include_usage, one more has empty choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: None = None
    so8t: So8tInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ChatError(BaseModel):
    message: str
    type: str
    param: str | None
    code: str
    fields: list[dict[str, str]] | None = None


class ChatErrorBody(BaseModel):
    """An error response of /v1, and the `data:` event that ends a stream that failed. `so8t` is set when a reply
    was withheld (status, detail, the thinking's hash)."""

    error: ChatError
    request_id: str | None
    so8t: So8tInfo | None = None
