# ruff: noqa: E501 - the templates are data, kept in the lines their authors wrote
"""Chat templates of reasoning and tool-calling model families, and small random-weight models
that use them, built offline.

The templates cannot be downloaded here (tests never reach the hub), so they are written out
below from the published tokenizer_config.json files as faithfully as we know them: the
structure, the markers and the text a model sees are the real ones; long instruction texts are
kept where they shape the format and shortened elsewhere. Each says what it follows.
"""

from __future__ import annotations

from pathlib import Path

from enginehouse.testing import build_model, build_tokenizer, model_configs

# Qwen3 (Qwen/Qwen3-8B and the other Qwen3 hybrid-thinking checkpoints): ChatML, Hermes-style
# tool calls, `<think>` blocks, and `enable_thinking=False` closing an empty block in the
# generation prompt. Earlier turns' reasoning is dropped; turns after the last user query keep
# it (multi-step tool use), read from `reasoning_content` or from the content itself.
QWEN3 = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# DeepSeek-R1 (deepseek-ai/DeepSeek-R1-0528): the system prompt, tools listed in it, DeepSeek
# V3's tool-call tokens with fenced JSON arguments, earlier answers stripped of their reasoning,
# and a generation prompt that opens the reasoning (`<think>\n`): the model's output starts
# inside it. One change: the real template concatenates a call's `arguments` as text, which
# enginehouse (like vLLM) hands to templates as an object, so they go through `tojson` here.
DEEPSEEK_R1 = """\
{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}\
{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}\
{%- for message in messages %}{%- if message['role'] == 'system' %}\
{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}\
{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}\
{%- endif %}{%- endfor %}\
{%- if tools is defined and tools is not none %}\
{% set tool_ns = namespace(text='## Tools\\n\\n### Function\\n\\nYou have the following functions available:\\n\\n') %}\
{%- for tool in tools %}{% set tool_ns.text = tool_ns.text + '- `' + tool['function']['name'] + '`:\\n```json\\n' + (tool['function'] | tojson) + '\\n```\\n' %}{%- endfor %}\
{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + tool_ns.text %}\
{%- endif %}\
{{ bos_token }}{{ ns.system_prompt }}\
{%- for message in messages %}\
{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}\
{%- if message['role'] == 'assistant' and 'tool_calls' in message %}{%- set ns.is_tool = false -%}\
{%- for tool in message['tool_calls'] %}\
{%- if not ns.is_first %}\
{%- if message['content'] is none or message['content'] == '' %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + (tool['function']['arguments'] | tojson) + '\\n' + '```' + '<｜tool▁call▁end｜>'}}\
{%- else %}{{'<｜Assistant｜>' + message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + (tool['function']['arguments'] | tojson) + '\\n' + '```' + '<｜tool▁call▁end｜>'}}\
{%- endif %}{%- set ns.is_first = true -%}\
{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + (tool['function']['arguments'] | tojson) + '\\n' + '```' + '<｜tool▁call▁end｜>'}}\
{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}\
{%- endif %}\
{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}\
{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}\
{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}\
{%- endif %}\
{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}\
{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}\
{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}\
{%- endif %}\
{%- endfor -%}\
{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}\
{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}\
"""

# Qwen3-Coder (Qwen/Qwen3-Coder-30B-A3B-Instruct): tools described in XML, and calls written as
# <tool_call><function=NAME><parameter=KEY>VALUE</parameter></function></tool_call>. The
# instruction text is shortened; the format lines are the real ones.
QWEN3_CODER = """\
{%- if messages[0]["role"] == "system" %}{%- set system_message = messages[0]["content"] %}{%- set loop_messages = messages[1:] %}\
{%- else %}{%- set loop_messages = messages %}{%- endif %}\
{%- if not tools is defined or tools is none %}{%- set tools = [] %}{%- endif %}\
{%- if system_message is defined %}{{- "<|im_start|>system\\n" + system_message }}\
{%- elif tools is iterable and tools | length > 0 %}{{- "<|im_start|>system\\nYou are Qwen, a helpful AI assistant that can interact with a computer to solve tasks." }}{%- endif %}\
{%- if tools is iterable and tools | length > 0 %}\
{{- "\\n\\n# Tools\\n\\nYou have access to the following functions:\\n\\n<tools>" }}\
{%- for tool in tools %}{%- if tool.function is defined %}{%- set tool = tool.function %}{%- endif %}\
{{- "\\n<function>\\n<name>" ~ tool.name ~ "</name>" }}\
{%- if tool.description is defined %}{{- '\\n<description>' ~ (tool.description | trim) ~ '</description>' }}{%- endif %}\
{{- '\\n<parameters>' }}\
{%- if tool.parameters is defined and tool.parameters is mapping and tool.parameters.properties is defined and tool.parameters.properties is mapping %}\
{%- for param_name, param_fields in tool.parameters.properties|items %}\
{{- '\\n<parameter>\\n<name>' ~ param_name ~ '</name>' }}\
{%- if param_fields.type is defined %}{{- '\\n<type>' ~ (param_fields.type | string) ~ '</type>' }}{%- endif %}\
{{- '\\n</parameter>' }}\
{%- endfor %}{%- endif %}\
{{- '\\n</parameters>\\n</function>' }}\
{%- endfor %}\
{{- "\\n</tools>" }}\
{{- '\\n\\nIf you choose to call a function ONLY reply in the following format with NO suffix:\\n\\n<tool_call>\\n<function=example_function_name>\\n<parameter=example_parameter_1>\\nvalue_1\\n</parameter>\\n</function>\\n</tool_call>' }}\
{%- endif %}\
{%- if system_message is defined or tools | length > 0 %}{{- '<|im_end|>\\n' }}{%- endif %}\
{%- for message in loop_messages %}\
{%- if message.role == "assistant" and message.tool_calls is defined and message.tool_calls is iterable and message.tool_calls | length > 0 %}\
{{- '<|im_start|>' + message.role }}\
{%- if message.content is defined and message.content is string and message.content | trim | length > 0 %}{{- '\\n' + message.content | trim + '\\n' }}{%- endif %}\
{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}\
{{- '\\n<tool_call>\\n<function=' + tool_call.name + '>\\n' }}\
{%- if tool_call.arguments is defined %}{%- for args_name, args_value in tool_call.arguments|items %}\
{{- '<parameter=' + args_name + '>\\n' }}\
{%- set args_value = args_value | tojson if args_value is mapping or (args_value is sequence and args_value is not string) else args_value | string %}\
{{- args_value }}{{- '\\n</parameter>\\n' }}\
{%- endfor %}{%- endif %}\
{{- '</function>\\n</tool_call>' }}\
{%- endfor %}{{- '<|im_end|>\\n' }}\
{%- elif message.role == "user" or message.role == "system" or message.role == "assistant" %}\
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\
{%- elif message.role == "tool" %}\
{%- if loop.previtem and loop.previtem.role != "tool" %}{{- '<|im_start|>user\\n' }}{%- endif %}\
{{- '<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>\\n' }}\
{%- if not loop.last and loop.nextitem.role != "tool" %}{{- '<|im_end|>\\n' }}{%- elif loop.last %}{{- '<|im_end|>\\n' }}{%- endif %}\
{%- endif %}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\
"""

# A pythonic tool-call template in the style of Llama 4's and of vLLM's Gemma 3 / Llama 3.2
# pythonic templates: the tools as JSON in the system turn, calls written as a Python list of
# calls, `[get_weather(city="Paris"), now()]`. (Gemma 3 ships no tool template of its own.)
PYTHONIC = """\
{{- bos_token }}\
{%- if tools %}<|header_start|>system<|header_end|>\\n\\n\
You can call functions. If you decide to call one or more, reply ONLY in the format \
[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]\\n\
Here is a list of functions in JSON format that you can invoke.\\n\
{%- for t in tools %}{{ t | tojson }}\\n{% endfor %}<|eot|>{%- endif %}\
{%- for message in messages %}\
{%- if message.role == 'assistant' and message.tool_calls %}<|header_start|>assistant<|header_end|>\\n\\n[\
{%- for call in message.tool_calls %}{{ call.function.name }}(\
{%- for k, v in call.function.arguments | items %}{{ k }}={{ v | tojson }}{% if not loop.last %}, {% endif %}{% endfor %})\
{%- if not loop.last %}, {% endif %}{% endfor %}]<|eot|>\
{%- elif message.role == 'tool' %}<|header_start|>ipython<|header_end|>\\n\\n{{ message.content }}<|eot|>\
{%- else %}<|header_start|>{{ message.role }}<|header_end|>\\n\\n{{ message.content }}<|eot|>{%- endif %}\
{%- endfor %}\
{%- if add_generation_prompt %}<|header_start|>assistant<|header_end|>\\n\\n{%- endif %}\
"""

# GLM-4.5 (zai-org/GLM-4.5): `[gMASK]<sop>`, role tokens, tools listed in the system turn, calls
# as <tool_call>NAME <arg_key>/<arg_value> pairs, tool results as <|observation|>, and
# `enable_thinking=False` closing an empty <think></think>. Instruction text shortened.
GLM45 = """\
[gMASK]<sop>\
{%- if tools -%}<|system|>
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

For each function call, output the function name and arguments within the following XML format:
<tool_call>{function-name}
<arg_key>{arg-key-1}</arg_key>
<arg_value>{arg-value-1}</arg_value>
...
</tool_call>{%- endif -%}
{%- for m in messages %}
{%- if m.role == 'system' %}<|system|>
{{ m.content }}
{%- elif m.role == 'user' %}<|user|>
{{ m.content }}
{%- elif m.role == 'assistant' %}<|assistant|>
{%- if m.reasoning_content %}
<think>{{ m.reasoning_content }}</think>{% else %}
<think></think>{% endif %}
{%- if m.content %}
{{ m.content.strip() }}{% endif %}
{%- if m.tool_calls %}{% for tc in m.tool_calls %}
<tool_call>{{ tc.function.name }}
{% for k, v in tc.function.arguments | items %}<arg_key>{{ k }}</arg_key>
<arg_value>{{ v | tojson if v is not string else v }}</arg_value>
{% endfor %}</tool_call>{% endfor %}{% endif %}
{%- elif m.role == 'tool' %}<|observation|>
<tool_response>
{{ m.content }}
</tool_response>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and not enable_thinking %}
<think></think>{% endif %}{% endif %}"""

# gpt-oss (openai/gpt-oss-20b), much shortened: the harmony format's system and developer
# messages (the effort as "Reasoning: ..."; the tools as a TypeScript namespace), messages as
# <|start|>ROLE<|channel|>...<|message|>...<|end|>, a tool call as a commentary message to
# functions.NAME ended by <|call|>, and the generation prompt <|start|>assistant.
HARMONY = """\
<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Reasoning: {{ reasoning_effort | default('medium') }}

# Valid channels: analysis, commentary, final. Channel must be included for every message.\
{% if tools %}
Calls to these tools must go to the commentary channel: 'functions'.{% endif %}<|end|>\
{%- if tools %}<|start|>developer<|message|># Tools

## functions

namespace functions {
{% for t in tools %}// {{ t.function.description }}
type {{ t.function.name }} = (_: {{ (t.function.parameters or {}) | tojson }}) => any;
{% endfor %}} // namespace functions<|end|>{% endif %}
{%- for m in messages %}
{%- if m.role == 'user' %}<|start|>user<|message|>{{ m.content }}<|end|>
{%- elif m.role == 'system' %}<|start|>developer<|message|># Instructions

{{ m.content }}<|end|>
{%- elif m.role == 'assistant' %}
{%- if m.tool_calls %}{% for tc in m.tool_calls %}<|start|>assistant<|channel|>commentary to=functions.{{ tc.function.name }} <|constrain|>json<|message|>{{ tc.function.arguments | tojson }}<|call|>{% endfor %}
{%- else %}<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>{% endif %}
{%- elif m.role == 'tool' %}<|start|>functions.tool to=assistant<|channel|>commentary<|message|>{{ m.content }}<|end|>
{%- endif %}{% endfor %}
{%- if add_generation_prompt %}<|start|>assistant{% endif %}"""
HARMONY_TOKENS = [
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|channel|>",
    "<|constrain|>",
    "<|return|>",
    "<|call|>",
]

FAMILIES = {
    # name: (template, added tokens as they are added in the real tokenizer)
    "qwen3": (QWEN3, ["<think>", "</think>", "<tool_call>", "</tool_call>"]),
    "deepseek_r1": (
        DEEPSEEK_R1,
        [
            "<｜User｜>",
            "<｜Assistant｜>",
            "<｜end▁of▁sentence｜>",
            "<think>",
            "</think>",
            "<｜tool▁calls▁begin｜>",
            "<｜tool▁call▁begin｜>",
            "<｜tool▁sep｜>",
            "<｜tool▁call▁end｜>",
            "<｜tool▁calls▁end｜>",
            "<｜tool▁outputs▁begin｜>",
            "<｜tool▁output▁begin｜>",
            "<｜tool▁output▁end｜>",
            "<｜tool▁outputs▁end｜>",
        ],
    ),
    "qwen3_coder": (QWEN3_CODER, ["<tool_call>", "</tool_call>"]),
    "pythonic": (PYTHONIC, ["<|header_start|>", "<|header_end|>", "<|eot|>"]),
    "glm45": (
        GLM45,
        [
            "[gMASK]",
            "<sop>",
            "<|system|>",
            "<|user|>",
            "<|assistant|>",
            "<|observation|>",
            "<think>",
            "</think>",
            "<tool_call>",
            "</tool_call>",
            "<arg_key>",
            "</arg_key>",
            "<arg_value>",
            "</arg_value>",
        ],
    ),
    "gpt_oss": (HARMONY, []),  # its markers are special tokens: HARMONY_TOKENS
}


def build_family_model(folder: Path, family: str, context: int = 2048) -> Path:
    """A small random-weight Qwen2-shaped model with `family`'s chat template and its marker
    tokens added to a trained tokenizer (one token each, as in the real vocabularies)."""
    template, added = FAMILIES[family]
    special = HARMONY_TOKENS if family == "gpt_oss" else []
    config = model_configs(512)["qwen2"]
    config.max_position_embeddings = context
    tokenizer = build_tokenizer(folder, 512 - len(added) - len(special) - 8, template)
    tokenizer.add_tokens(added)
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": special})
        # gpt-oss ends a turn with <|return|> or, after a tool call, <|call|>.
        config.eos_token_id = [2, *tokenizer.convert_tokens_to_ids(["<|return|>", "<|call|>"])]
    return build_model(folder, config, template, tokenizer=tokenizer)
