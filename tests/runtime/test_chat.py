"""Chat: the checkpoint's template rendered as transformers renders it, the answer parsers
(thinking channel, tool calls), ``Gemma4Runtime.chat`` and ``gemma4x chat``.

The template under test (tests/data/gemma4_chat_template.jinja) follows the prompt grammar of
the spec (section 8.2); the oracle for rendering is transformers' ``apply_chat_template`` on
the same template and tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import gemma4_tiny as gt
import pytest
from gemma4x.chat import (
    ChatTemplateError,
    ToolCall,
    load_chat_template,
    parse_tool_calls,
    render_chat,
    split_reasoning,
    strip_control_tokens,
)

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "data" / "gemma4_chat_template.jinja"
TEMPLATE = TEMPLATE_PATH.read_text()
SPECIALS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city"}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time, in a zone"}},
]
CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "Hello there"}],
    "system + turns": [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Wetter in Köln? 天気"},
    ],
    "tool exchange": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2, "metric": True}}}
            ],
        },
        {"role": "tool", "name": "get_weather", "content": "sunny"},
    ],
}


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    pytest.importorskip("tokenizers")
    from gemma4x.checkpoint import CHAT_SPECIAL_TOKENS, write_tiny_tokenizer
    from transformers import PreTrainedTokenizerFast

    path = write_tiny_tokenizer(tmp_path_factory.mktemp("tok"), 300, CHAT_SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_file=str(path), **SPECIALS)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("with_tools", [False, True])
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_render_matches_transformers(hf_tokenizer, name, thinking, with_tools, gen_prompt):
    messages = CONVERSATIONS[name]
    tools = TOOLS if with_tools else None
    want = hf_tokenizer.apply_chat_template(
        messages, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=gen_prompt, tools=tools,
        enable_thinking=thinking,
    )  # fmt: skip
    got = render_chat(TEMPLATE, messages, add_generation_prompt=gen_prompt, tools=tools, special_tokens=SPECIALS,
                      enable_thinking=thinking)  # fmt: skip
    assert got == want
    assert got.startswith("<bos>") and got.count("<bos>") == 1


def test_render_helpers_match_transformers(hf_tokenizer):
    """tojson (non-ASCII kept, indent), loop controls and the reasoning-field aliases."""
    template = (
        "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{{ m | tojson }}|{{ m.reasoning_content | default('-') }}|{{ m.thinking | default('-') }}\n{% endfor %}"
        "{{ tools | tojson(indent=2) }}"
    )
    messages = [
        {"role": "user", "content": "héllo 天"},
        {"role": "skip", "content": "x"},
        {"role": "assistant", "content": "ok", "reasoning": "because"},
    ]
    want = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, tools=TOOLS)
    assert render_chat(template, messages, tools=TOOLS, special_tokens=SPECIALS, add_generation_prompt=False) == want


def test_render_errors():
    with pytest.raises(ChatTemplateError, match="refused the conversation: no system here"):
        render_chat("{{ raise_exception('no system here') }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render_chat("{% for %}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="message 1 has no 'role'"):
        render_chat(TEMPLATE, [{"role": "user", "content": "x"}, {"content": "y"}])
    with pytest.raises(ChatTemplateError, match="must be a list of messages"):
        render_chat(TEMPLATE, "hello")
    with pytest.raises(ChatTemplateError, match="empty"):
        render_chat(TEMPLATE, [])
    with pytest.raises(ChatTemplateError, match="rendering the chat template failed"):
        render_chat("{{ messages[0].content.missing() }}", [{"role": "user", "content": "x"}])


def test_load_chat_template(tmp_path):
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "A"}))
    assert load_chat_template(tmp_path) == "A"
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})
    )
    assert load_chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")  # the file wins
    assert load_chat_template(tmp_path) == "J"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(ChatTemplateError, match="must be a string"):
        load_chat_template(tmp_path)


@pytest.mark.parametrize(
    "text, reasoning, content",
    [
        ("<|channel>thought\nLet me see.<channel|>It is 4.", "Let me see.", "It is 4."),
        ("<|channel>thought\nstill thinking", "still thinking", ""),  # cut off while thinking
        ("Just an answer.", None, "Just an answer."),
        ("<|channel>thought\n<channel|>Quick.", "", "Quick."),  # the empty thought of a non-thinking prompt
    ],
)
def test_split_reasoning(text, reasoning, content):
    assert split_reasoning(text) == (reasoning, content)


def test_parse_tool_calls():
    text = (
        'Checking. <|tool_call>call:get_weather{city:<|"|>Paris, {FR}<|"|>, days:3,units:{temp:c,precise:true},'
        'tags:[<|"|>a<|"|>,2.5,null],ratio:-1e-3,<|"|>quoted key<|"|>:none}<tool_call|>'
        "<|tool_call>call:ns.get-time{}<turn|>"
    )
    content, calls = parse_tool_calls(text)
    assert content == "Checking."
    assert calls == [
        ToolCall("get_weather", {"city": "Paris, {FR}", "days": 3, "units": {"temp": "c", "precise": True},
                                 "tags": ["a", 2.5, None], "ratio": -1e-3, "quoted key": None}),
        ToolCall("ns.get-time", {}),
    ]  # fmt: skip
    assert parse_tool_calls("no calls here") == ("no calls here", [])
    assert parse_tool_calls("<|tool_call>call:f{x:1}<tool_call|>") == (None, [ToolCall("f", {"x": 1})])
    with pytest.raises(ValueError, match="tool call 'f': malformed arguments"):
        parse_tool_calls('<|tool_call>call:f{x:<|"|>open}<tool_call|>')


def test_strip_control_tokens():
    assert strip_control_tokens("<|turn>model\nHi<turn|><eos>") == "model\nHi"


# --- the runtime and the CLI ------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    pytest.importorskip("tokenizers")
    from gemma4x.checkpoint import CHAT_SPECIAL_TOKENS, write_tiny_tokenizer

    path = tmp_path_factory.mktemp("chat_ckpt")
    gt.make_checkpoint({**gt.DENSE, "vocab_size": 320}, path, seed=5)
    write_tiny_tokenizer(path, 300, CHAT_SPECIAL_TOKENS)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def chat_rt(chat_checkpoint):
    from gemma4x.runtime import Gemma4Runtime

    return Gemma4Runtime.from_pretrained(chat_checkpoint, max_batch_size=2, max_seq_len=128)


def test_runtime_chat_prompt_and_result(chat_rt):
    convs = [CONVERSATIONS["one user turn"], CONVERSATIONS["system + turns"]]
    out = chat_rt.chat(convs, max_new_tokens=6)
    assert len(out) == 2
    for conv, r in zip(convs, out):
        # The prompt is the rendered template, encoded without a second BOS, and generation is greedy.
        ids = chat_rt.tokenizer.encode(render_chat(TEMPLATE, conv, special_tokens=SPECIALS), add_bos=False)
        assert ids[0] == 2 and ids[1] != 2
        assert r.token_ids == chat_rt.generate([ids], max_new_tokens=6, stop_token_ids=[chat_rt.tokenizer.token_id(
            "<turn|>")])[0].token_ids  # fmt: skip
        assert r.raw == chat_rt.tokenizer.decode(r.token_ids, skip_special_tokens=False)
        assert r.finish_reason in ("stop", "length") and isinstance(r.content, str)
    assert chat_rt.tokenizer.encode("<|turn>", add_bos=False) == [chat_rt.tokenizer.token_id("<|turn>")]


def test_runtime_chat_parses_the_answer(chat_rt, monkeypatch):
    """What the model writes back: thinking channel, content, tool calls, the stop token removed."""
    from gemma4x.runtime import GenerationResult

    tok = chat_rt.tokenizer
    answer = ('<|channel>thought\nplan it<channel|>Sure. <|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|>'
              "<|tool_response>")  # fmt: skip
    ids = tok.encode(answer, add_bos=False)
    seen = {}

    def fake_generate(prompts, max_new_tokens, stop_token_ids=(), **kw):
        seen["stops"] = list(stop_token_ids)
        return [GenerationResult(ids, None, "stop") for _ in prompts]

    monkeypatch.setattr(chat_rt, "generate", fake_generate)
    r = chat_rt.chat([CONVERSATIONS["one user turn"]], tools=TOOLS, enable_thinking=True)[0]
    assert r.reasoning == "plan it"
    assert r.content == "Sure."
    assert r.tool_calls == [ToolCall("get_weather", {"city": "Oslo"})]
    assert tok.token_id("<|tool_response>") in seen["stops"] and tok.token_id("<turn|>") in seen["stops"]


def test_runtime_chat_keeps_a_malformed_call_as_text(chat_rt, monkeypatch):
    from gemma4x.runtime import GenerationResult

    ids = chat_rt.tokenizer.encode('<|tool_call>call:f{x:<|"|>open}<tool_call|><turn|>', add_bos=False)
    monkeypatch.setattr(chat_rt, "generate", lambda prompts, *a, **kw: [GenerationResult(ids, None, "stop")])
    r = chat_rt.chat([CONVERSATIONS["one user turn"]], tools=TOOLS)[0]
    assert r.tool_calls == [] and r.content == 'call:f{x:<|"|>open}'


def test_runtime_chat_errors(chat_rt, tmp_path):
    from gemma4x.runtime import Gemma4Runtime

    with pytest.raises(ChatTemplateError, match="conversation 1: message 0 has no 'role'"):
        chat_rt.chat([CONVERSATIONS["one user turn"], [{"content": "x"}]])
    with pytest.raises(ChatTemplateError, match="must be a list of conversations"):
        chat_rt.chat("hello")
    gt.make_checkpoint(gt.DENSE, tmp_path, seed=1)
    rt = Gemma4Runtime.from_pretrained(tmp_path, max_batch_size=1, max_seq_len=32)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        rt.chat([CONVERSATIONS["one user turn"]])


def test_cli_chat(chat_checkpoint, capsys):
    from gemma4x.cli import main

    rc = main(["chat", "--model", str(chat_checkpoint), "--message", "Hello there", "--system", "Be brief.",
               "--max-new-tokens", "4", "--device", "cpu"])  # fmt: skip
    _, err = capsys.readouterr()
    assert rc == 0, err
    assert "prompt tokens" in err and "generated" in err
    rc = main(["chat", "--model", str(chat_checkpoint), "--message", "Hi", "--enable-thinking", "--max-new-tokens", "3",
               "--device", "cpu", "--temperature", "0.8", "--seed", "3"])  # fmt: skip
    assert rc == 0
    rc = main(["chat", "--model", str(chat_checkpoint.parent), "--message", "x", "--device", "cpu"])
    assert rc == 2 and "no config.json" in capsys.readouterr().err
