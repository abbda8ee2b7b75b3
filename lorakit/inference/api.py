"""The OpenAI API's shapes as the server reads and writes them: request bodies (pydantic
models), errors, usage and the chunks of a streamed answer."""

# No "from __future__ import annotations": pydantic (through FastAPI) reads the real annotations.

import time
import uuid
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .generation import Output

__all__ = ["Message", "Common", "ChatBody", "CompletionBody", "AdapterBody", "ApiError", "usage", "Reply"]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Union[str, list[dict], None] = None


class Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    n: int = 1


class ChatBody(Common):
    messages: list[Message] = Field(min_length=1)


class CompletionBody(Common):
    prompt: str


class AdapterBody(BaseModel):
    name: str


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def usage(out: Output) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


class Reply:
    """The response objects of one chat or text completion: whole, or as stream chunks."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model, self.chat = model, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, out: Output) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out.text}, "finish_reason": out.finish_reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage(out)}
        choice = {"index": 0, "text": out.text, "finish_reason": out.finish_reason, "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage(out)}

    def chunk(self, piece: Optional[str]) -> dict:
        """A streamed piece of text; for chat, ``None`` is the first chunk that announces the role."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if piece is None else {"content": piece}
            return {**self._head("chat.completion.chunk"), "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        return {**self._head("text_completion"),
                "choices": [{"index": 0, "text": piece, "finish_reason": None, "logprobs": None}]}

    def last(self, out: Output) -> dict:
        """The closing chunk: the finish reason and the usage."""
        if self.chat:
            choice = {"index": 0, "delta": {}, "finish_reason": out.finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice], "usage": usage(out)}
        choice = {"index": 0, "text": "", "finish_reason": out.finish_reason, "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage(out)}
