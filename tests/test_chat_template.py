"""Chat templates render as transformers renders them (expected strings checked against transformers 4.57)."""

import pytest

from edge_runtime.chat_template import CHATML, ChatTemplate
from edge_runtime.errors import TemplateError

# SmolLM2's tokenizer_config.json chat_template (JSON "\\n" -> the Jinja string escape \n).
SMOLLM2 = (
    r"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    r"{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    r"{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    r"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
]
CONVERSATION_TEXT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n"
    "<|im_start|>user\n2+2?<|im_end|>\n"
)


def test_chatml_renders_exactly():
    chatml = ChatTemplate(CHATML)
    assert chatml.render(CONVERSATION) == CONVERSATION_TEXT + "<|im_start|>assistant\n"
    assert chatml.render(CONVERSATION, add_generation_prompt=False) == CONVERSATION_TEXT
    assert chatml.render([{"role": "user", "content": "Hi"}]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_smollm2_adds_default_system_prompt_only_when_missing():
    smol = ChatTemplate(SMOLLM2)
    assert smol.render([{"role": "user", "content": "Hi"}]) == (
        SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert smol.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False) == (
        SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n"
    )
    assert smol.render(CONVERSATION) == CONVERSATION_TEXT + "<|im_start|>assistant\n"


def test_hf_environment_features():
    # Whitespace control (trim_blocks, lstrip_blocks), loop controls, the generation tag, special tokens as
    # variables, tools defaulting to none, and tojson without HTML escaping: all as transformers renders them.
    source = (
        "{{ bos_token }}\n"
        "{% if tools is not none %}\nTOOLS {{ tools | tojson }}\n{% endif %}\n"
        "{% for m in messages %}\n"
        "    {% if m.role == 'skip' %}{% continue %}{% endif %}\n"
        "    {% generation %}[{{ m.role }}] {{ m.content | tojson }}{% endgeneration %}\n\n"
        "{% endfor %}\n"
        "{{ eos_token }}"
    )
    messages = [
        {"role": "user", "content": "héllo <b>&"},
        {"role": "skip", "content": "x"},
        {"role": "assistant", "content": "ok"},
    ]
    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    body = '[user] "héllo <b>&"\n[assistant] "ok"\n</s>'
    assert template.render(messages, add_generation_prompt=False) == "<s>\n" + body
    assert template.render(messages, tools=[{"name": "f"}]) == '<s>\nTOOLS [{"name": "f"}]\n' + body


def test_strftime_now_is_available():
    rendered = ChatTemplate("{{ strftime_now('%Y') }}").render([])
    assert rendered.isdigit() and len(rendered) == 4


def test_raise_exception_becomes_template_error_with_its_message():
    source = (
        "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
        "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{{ m.content }}{% endfor %}"
    )
    template = ChatTemplate(source)
    assert template.render([{"role": "user", "content": "ok"}]) == "ok"
    with pytest.raises(TemplateError, match="Only user and assistant roles are supported!"):
        template.render([{"role": "system", "content": "no"}])


def test_syntax_error_at_construction():
    with pytest.raises(TemplateError, match=r"syntax error at line 2"):
        ChatTemplate("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(TemplateError, match="syntax error"):
        ChatTemplate("{% if add_generation_prompt %}unclosed")


def test_render_failure_becomes_template_error():
    with pytest.raises(TemplateError, match="UndefinedError"):
        ChatTemplate("{{ messages[0].content.missing.deeper }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(TemplateError, match="failed to render"):
        ChatTemplate("{{ messages[5]['content'] | upper }}{{ 1 // 0 }}").render([])


def test_sandbox_blocks_mutation():
    # ImmutableSandboxedEnvironment: a template cannot modify the caller's messages.
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(TemplateError, match="SecurityError"):
        ChatTemplate("{{ messages.append({'role': 'user'}) }}").render(messages)
    assert messages == [{"role": "user", "content": "x"}]
