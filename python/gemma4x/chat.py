"""Chat prompts for Gemma 4 checkpoints, and the parsers of what the model writes back.

A checkpoint ships its prompt format as a Jinja template (``chat_template.jinja``, or the
``chat_template`` entry of ``tokenizer_config.json``). :func:`render_chat` renders it the way
transformers' ``apply_chat_template`` does: the same sandboxed Jinja environment settings
(``trim_blocks``, ``lstrip_blocks``, loop controls), the same helpers (``raise_exception``,
``strftime_now``, a ``tojson`` that keeps non-ASCII text) and the same variables (``messages``,
``tools``, ``add_generation_prompt``, the special tokens, extra keywords such as
``enable_thinking``). The template writes ``<bos>`` itself, so the rendered text is encoded
without adding another.

The model's answer (decoded with its special tokens) may hold a thinking channel and tool calls
(spec section 8):

    <|channel>thought\\n{reasoning}<channel|>{answer}<turn|>
    <|tool_call>call:NAME{key:value,...}<tool_call|>     (several may follow each other)

:func:`split_reasoning` and :func:`parse_tool_calls` take them apart.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = [
    "ChatTemplateError",
    "ToolCall",
    "load_chat_template",
    "load_special_tokens",
    "parse_tool_calls",
    "render_chat",
    "split_reasoning",
    "strip_control_tokens",
]

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<|tool_call>", "<tool_call|>"
STRING_DELIM = '<|"|>'
TURN_CLOSE = "<turn|>"
TOOL_RESPONSE_OPEN = "<|tool_response>"
# Gemma 4's chat control tokens (spec 8.1), each one special token of the tokenizer.
CHAT_TOKENS = (
    "<|turn>", TURN_CLOSE, CHANNEL_OPEN, CHANNEL_CLOSE, "<|think|>", "<|tool>", "<tool|>", TOOL_CALL_OPEN,
    TOOL_CALL_CLOSE, TOOL_RESPONSE_OPEN, "<tool_response|>", STRING_DELIM,
)  # fmt: skip
# Never part of an answer's text: the control tokens (the string delimiter aside: it belongs to a
# tool call's text) and the plain specials.
_CONTROL_RE = re.compile(
    "|".join(re.escape(t) for t in (*CHAT_TOKENS, "<bos>", "<eos>", "<pad>") if t != STRING_DELIM)
)
# What templates call the plain specials, with Gemma's values where tokenizer_config.json has none.
_DEFAULT_SPECIAL_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
# Message fields a reasoning text may come under; templates read the first (as transformers aliases them).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """No usable chat template, a malformed conversation, or an error the template raised."""


# --- the template ------------------------------------------------------------------------------


def load_chat_template(model_dir: str | Path) -> str | None:
    """The checkpoint's chat template: ``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template`` (a string, or a list of named templates: the one named "default"); None if
    it has neither."""
    model_dir = Path(model_dir)
    path = model_dir / TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    cfg_path = model_dir / TOKENIZER_CONFIG_FILE
    if not cfg_path.is_file():
        return None
    try:
        template = json.loads(cfg_path.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ChatTemplateError(f"cannot read {cfg_path}: {exc}") from exc
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ChatTemplateError(f"{cfg_path}: chat_template must be a string, got {type(template).__name__}")
    return template


def load_special_tokens(model_dir: str | Path) -> dict[str, str]:
    """``bos_token``, ``eos_token``, ``pad_token``, ``unk_token`` as chat templates name them: from
    ``tokenizer_config.json`` (strings or ``{"content": ...}``), else Gemma's."""
    out = dict(_DEFAULT_SPECIAL_TOKENS)
    cfg_path = Path(model_dir) / TOKENIZER_CONFIG_FILE
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ChatTemplateError(f"cannot read {cfg_path}: {exc}") from exc
        for key in out:
            v = cfg.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                out[key] = v
    return out


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


_COMPILED: dict[str, Any] = {}


def _compile(template: str):
    compiled = _COMPILED.get(template)
    if compiled is None:
        try:
            import jinja2
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:  # pragma: no cover - jinja2 comes with torch
            raise ChatTemplateError("chat templates need the `jinja2` package: pip install jinja2") from None
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            compiled = env.from_string(template)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"the chat template does not parse: {exc}") from exc
        _COMPILED[template] = compiled
    return compiled


def _check_messages(messages) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(
            f"a conversation must be a list of messages ({{'role': ..., 'content': ...}}), got {type(messages).__name__}"
        )
    if not messages:
        raise ChatTemplateError("the conversation is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        if not isinstance(m.get("role"), str):
            raise ChatTemplateError(f"message {i} has no 'role' string: {dict(m)!r}")
        m = dict(m)
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    special_tokens: Mapping[str, str] | None = None,
    **template_kwargs: Any,
) -> str:
    """The prompt text of one conversation, as ``apply_chat_template(..., tokenize=False)`` renders it.

    Args:
        template: the checkpoint's template (:func:`load_chat_template`).
        messages: ``[{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]``.
        add_generation_prompt: end with the opening of a model turn.
        tools: JSON-schema tool declarations the template may render.
        special_tokens: ``bos_token``, ``eos_token``, ... as the template names them.
        template_kwargs: further template variables, e.g. ``enable_thinking=True``.
    """
    compiled = _compile(template)
    context = {**(special_tokens or {}), **template_kwargs}
    if tools is not None:
        tools = [dict(t) for t in tools]
    try:
        return compiled.render(
            messages=_check_messages(messages), tools=tools, documents=None,
            add_generation_prompt=add_generation_prompt, **context,
        )  # fmt: skip
    except ChatTemplateError:
        raise
    except Exception as exc:  # jinja2's own errors (undefined attributes, type errors in the template)
        raise ChatTemplateError(f"rendering the chat template failed: {type(exc).__name__}: {exc}") from exc


# --- what the model writes back ------------------------------------------------------------------


def split_reasoning(text: str) -> tuple[str | None, str]:
    """``(reasoning, content)`` of a model answer decoded with its special tokens.

    The reasoning is the text between ``<|channel>`` and ``<channel|>`` without its leading
    ``thought\\n``; the content is what follows ``<channel|>``. An unclosed channel is all
    reasoning (the answer was cut off while thinking). Without a channel it is all content.
    """
    start = text.find(CHANNEL_OPEN)
    if start < 0:
        return None, text
    body = text[start + len(CHANNEL_OPEN) :]
    end = body.find(CHANNEL_CLOSE)
    reasoning, content = (body, "") if end < 0 else (body[:end], body[end + len(CHANNEL_CLOSE) :])
    if reasoning.startswith("thought\n"):
        reasoning = reasoning[len("thought\n") :]
    elif reasoning.startswith("thought"):
        reasoning = reasoning[len("thought") :]
    return reasoning, text[:start] + content


def strip_control_tokens(text: str) -> str:
    """``text`` without Gemma 4's control tokens (turn, channel, tool markers, bos/eos/pad)."""
    return _CONTROL_RE.sub("", text)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


_CALL_RE = re.compile(r"<\|tool_call>call:([\w\-\.]+)\{(.*?)\}(?:<tool_call\|>|<turn\|>)", re.DOTALL)
_NUMBER_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class _ArgParser:
    """The tool-argument grammar: ``key:value`` pairs; values are ``<|"|>text<|"|>`` strings,
    ``{...}`` maps, ``[...]`` lists, true/false, null/none/nil, numbers, or bare text."""

    def __init__(self, text: str):
        self.s = text
        self.i = 0

    def _skip_ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def _peek(self, token: str) -> bool:
        return self.s.startswith(token, self.i)

    def _string(self) -> str:
        start = self.i + len(STRING_DELIM)
        end = self.s.find(STRING_DELIM, start)
        if end < 0:
            raise ValueError(f"unterminated string at offset {self.i}")
        self.i = end + len(STRING_DELIM)
        return self.s[start:end]

    def args(self, closing: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        self._skip_ws()
        while self.i < len(self.s) and not (closing and self._peek(closing)):
            if self._peek(STRING_DELIM):
                key = self._string()
                self._skip_ws()
            else:
                colon = self.s.find(":", self.i)
                if colon < 0:
                    raise ValueError(f"expected key:value at offset {self.i}")
                key = self.s[self.i : colon].strip()
                self.i = colon
            if not self._peek(":"):
                raise ValueError(f"expected ':' after key {key!r} at offset {self.i}")
            self.i += 1
            out[key] = self.value(closing)
            self._skip_ws()
            if self._peek(","):
                self.i += 1
                self._skip_ws()
        return out

    def value(self, closing: str | None) -> Any:
        self._skip_ws()
        if self._peek(STRING_DELIM):
            return self._string()
        if self._peek("{"):
            self.i += 1
            v = self.args("}")
            self._expect("}")
            return v
        if self._peek("["):
            self.i += 1
            items = []
            self._skip_ws()
            while not self._peek("]"):
                if self.i >= len(self.s):
                    raise ValueError("unterminated list")
                items.append(self.value("]"))
                self._skip_ws()
                if self._peek(","):
                    self.i += 1
                    self._skip_ws()
            self._expect("]")
            return items
        end = self.i
        stops = {",", "}", "]"} if closing is None else {",", closing, "}", "]"}
        while end < len(self.s) and self.s[end] not in stops:
            end += 1
        token = self.s[self.i : end].strip()
        self.i = end
        low = token.lower()
        if low == "true":
            return True
        if low == "false":
            return False
        if low in ("null", "none", "nil"):
            return None
        if _NUMBER_RE.fullmatch(token):
            return float(token) if any(c in token for c in ".eE") else int(token)
        return token

    def _expect(self, token: str) -> None:
        self._skip_ws()
        if not self._peek(token):
            raise ValueError(f"expected {token!r} at offset {self.i}")
        self.i += len(token)


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """``(content, calls)`` of a model answer decoded with its special tokens.

    ``content`` is the text before the first ``<|tool_call>`` (stripped; None if empty) when
    there are calls, else the whole text. A call whose arguments do not parse raises
    :class:`ValueError` naming the call.
    """
    calls = []
    for m in _CALL_RE.finditer(text):
        try:
            calls.append(ToolCall(m.group(1), _ArgParser(m.group(2)).args(None)))
        except ValueError as exc:
            raise ValueError(f"tool call {m.group(1)!r}: malformed arguments {m.group(2)!r}: {exc}") from None
    if not calls:
        return text, []
    content = text[: text.find(TOOL_CALL_OPEN)].strip()
    return (content or None), calls
