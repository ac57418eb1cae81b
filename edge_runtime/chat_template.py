"""Chat templates: a Hugging Face tokenizer_config.json `chat_template` (Jinja) -> prompt string.

The environment mirrors transformers' (sandboxed, trim_blocks, lstrip_blocks, loopcontrols, the `generation` tag,
raise_exception / tojson / strftime_now) so a model's template renders here exactly as it does there.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TemplateError

# Plain ChatML, for models that ship without a template.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class _TemplateRaised(Exception):
    """raise_exception() called by the template itself (its message is meant for the user)."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Like transformers: plain json.dumps, without Jinja's HTML escaping.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks); renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template; render() turns a message list into the model's prompt text."""

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None) -> None:
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"chat template syntax error at line {e.lineno}: {e.message}") from e
        self.source = source
        # Passed as template variables, like transformers passes the tokenizer's special tokens.
        self._tokens = {name: tok for name, tok in (("bos_token", bos_token), ("eos_token", eos_token)) if tok is not None}

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True, **extra: Any) -> str:
        # tools/documents default to None (not undefined) as in transformers: templates test `tools is not none`.
        context: dict[str, Any] = {"tools": None, "documents": None, **self._tokens, **extra}
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        except _TemplateRaised as e:
            raise TemplateError(f"chat template rejected the messages: {e}") from e
        except Exception as e:  # noqa: BLE001 - the template is foreign code; any failure is a render failure
            raise TemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from e
