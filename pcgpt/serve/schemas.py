"""Request bodies of the OpenAI-compatible API (pydantic lives only here, at the HTTP boundary).

OpenAI's fields keep OpenAI's names, defaults and ranges; pcgpt's extensions are additions.
Unknown fields are refused (400), as OpenAI does, so a typo never silently falls back to a default.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 16
MAX_N = 16


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0 = greedy")
    top_p: float | None = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int | None = Field(1, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 64)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    user: str | None = Field(None, max_length=256)
    # --- pcgpt extensions ---
    top_k: int | None = Field(0, ge=0, le=1_000_000, description="keep the k most likely tokens (ties kept); 0 = off")
    min_p: float | None = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False, description="keep tokens with p >= min_p * p_max")
    repetition_penalty: float | None = Field(1.0, gt=0.0, le=10.0, allow_inf_nan=False,
                                             description="divide (multiply) positive (negative) logits of seen tokens")
    settle_steps: Annotated[int, Field(ge=0, le=16)] | Literal["auto"] | None = Field(
        None, description="PC models: settling steps per token; default the checkpoint's. \"auto\": settle (the "
                          "checkpoint's auto_settle_steps, stopping once the energy stops falling) only the tokens "
                          "whose unsettled entropy is at least settle_threshold")
    settle_threshold: float | None = Field(None, ge=0.0, le=64.0, allow_inf_nan=False,
                                           description="with settle_steps \"auto\": the entropy in bits at or above "
                                                       "which a token settles (default: the checkpoint's auto_threshold)")
    sampler: Literal["standard", "error_driven"] = "standard"
    mirostat_tau: float | None = Field(None, gt=0.0, le=64.0, allow_inf_nan=False,
                                       description="error-driven sampler: target surprise in bits (default: the checkpoint's)")
    mirostat_eta: float | None = Field(None, ge=0.0, le=10.0, allow_inf_nan=False,
                                       description="error-driven sampler: learning rate of the surprise threshold (default 0.1)")
    precision_gain: float | None = Field(None, ge=0.0, le=10.0, allow_inf_nan=False,
                                         description="error-driven sampler: λ, how strongly the prediction's error sets "
                                                     "the temperature (0 = fixed temperature; default: the checkpoint's, else 0.5)")
    uncertainty: bool = Field(False, description="add per-token uncertainty to each choice and stream chunk")
    truncate_prompt_tokens: int | None = Field(None, ge=1, le=1_000_000,
                                               description="keep only the last N prompt tokens (and fewer if the context needs)")
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _threshold_needs_auto(self):
        if self.settle_threshold is not None and self.settle_steps != "auto":
            raise ValueError("settle_threshold applies only with settle_steps \"auto\"")
        return self

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > 256 for s in stops):
            raise ValueError("stop strings must be at most 256 characters")
        return stops


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="text, texts, token ids or lists of ids")
    max_tokens: int | None = Field(16, ge=0, le=1_000_000, description="0 only with echo: score the prompt")
    logprobs: int | None = Field(None, ge=0, le=20, description="top alternatives per token (of the raw distribution)")
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: dict[str, float] | None = None


# --- response bodies, for the OpenAPI document (plain JSON Schema; the routes build dicts) --------
# Declared so that clients and schema-driven tests (tests/test_fuzz.py) can check every answer.

_NULLABLE_STR = {"type": ["string", "null"]}
_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
          "properties": {k: {"type": "integer", "minimum": 0} for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
_FINISH = {"type": "string", "enum": ["stop", "length"]}
_LOGPROBS = {"type": ["object", "null"]}
_UNCERTAINTY = {"type": "array", "items": {"type": "object"}}

ERROR_BODY = {
    "type": "object", "title": "Error", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"],
                             "additionalProperties": False,
                             "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                            "param": _NULLABLE_STR, "code": _NULLABLE_STR}}},
}
COMPLETION_BODY = {
    "type": "object", "title": "Completion", "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"},
        "model": {"type": "string"}, "usage": _USAGE,
        "choices": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["text", "index", "logprobs", "finish_reason"],
            "properties": {"text": {"type": "string"}, "index": {"type": "integer", "minimum": 0},
                           "logprobs": _LOGPROBS, "finish_reason": _FINISH, "uncertainty": _UNCERTAINTY}}},
    },
}
CHAT_COMPLETION_BODY = {
    "type": "object", "title": "ChatCompletion", "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"},
        "model": {"type": "string"}, "usage": _USAGE,
        "choices": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["index", "message", "logprobs", "finish_reason"],
            "properties": {"index": {"type": "integer", "minimum": 0}, "logprobs": _LOGPROBS, "finish_reason": _FINISH,
                           "message": {"type": "object", "required": ["role", "content"],
                                       "properties": {"role": {"const": "assistant"}, "content": _NULLABLE_STR}},
                           "uncertainty": _UNCERTAINTY}}},
    },
}
MODEL_CARD = {
    "type": "object", "title": "Model", "required": ["id", "object", "created", "owned_by"],
    "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                   "owned_by": {"type": "string"}, "model_type": {"type": "string"},
                   "parameters": {"type": "integer"}, "context_length": {"type": "integer"}},
}
MODEL_LIST = {"type": "object", "title": "ModelList", "required": ["object", "data"],
              "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": MODEL_CARD}}}
HEALTH_BODY = {"type": "object", "required": ["status"],
               "properties": {"status": {"type": "string", "enum": ["ok", "failed"]},
                              "models": {"type": "object", "additionalProperties": {"type": "string"}}}}
READY_BODY = {"type": "object", "required": ["status", "models"],
              "properties": {"status": {"type": "string", "enum": ["ready", "not ready"]},
                             "models": {"type": "object", "additionalProperties": {"type": "string"}}}}
_CHUNK_CHOICE = {"type": "object", "required": ["index", "logprobs", "finish_reason"],
                 "properties": {"index": {"type": "integer", "minimum": 0}, "logprobs": _LOGPROBS,
                                "finish_reason": {"type": ["string", "null"], "enum": ["stop", "length", None]},
                                "uncertainty": _UNCERTAINTY}}
COMPLETION_CHUNK = {
    "type": "object", "title": "CompletionChunk", "required": ["id", "object", "created", "model", "choices"],
    "properties": {"id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"},
                   "model": {"type": "string"}, "usage": _USAGE,
                   "choices": {"type": "array", "items": {**_CHUNK_CHOICE, "required": [*_CHUNK_CHOICE["required"], "text"],
                                                          "properties": {**_CHUNK_CHOICE["properties"],
                                                                         "text": {"type": "string"}}}}},
}
CHAT_COMPLETION_CHUNK = {
    "type": "object", "title": "ChatCompletionChunk", "required": ["id", "object", "created", "model", "choices"],
    "properties": {"id": {"type": "string"}, "object": {"const": "chat.completion.chunk"}, "created": {"type": "integer"},
                   "model": {"type": "string"}, "usage": _USAGE,
                   "choices": {"type": "array", "items": {**_CHUNK_CHOICE, "required": [*_CHUNK_CHOICE["required"], "delta"],
                                                          "properties": {**_CHUNK_CHOICE["properties"],
                                                                         "delta": {"type": "object"}}}}},
}


def stream_event(chunk: dict) -> dict:
    """One server-sent event of a stream: `data:` a chunk, an in-band error, or the final [DONE]."""
    return {"type": "object", "required": ["data"], "properties": {"data": {"type": "string", "anyOf": [
        {"const": "[DONE]"},
        {"contentMediaType": "application/json", "contentSchema": {"anyOf": [chunk, ERROR_BODY]}}]}}}
