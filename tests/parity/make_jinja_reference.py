#!/usr/bin/env python3
"""Reference renderings for moontune's Jinja engine (lua/moontune/jinja.lua).

For every chat template under tests/fixtures/jinja/templates/ (listed, with the model
it belongs to and where the string was copied from, in MANIFEST below) it renders a
set of conversations exactly as transformers' apply_chat_template does (through
transformers.utils.chat_template_utils.render_jinja_template, which compiles the
template in transformers' own sandboxed environment: trim_blocks, lstrip_blocks,
loopcontrols, the generation tag, raise_exception, strftime_now, tojson, dict and
namespace) and writes

    tests/fixtures/jinja/manifest.json    [{name, file, model, source}, ...]
    tests/fixtures/jinja/reference.json   {generator, versions, now, cases: [...]}

Each case: {template, case, messages (as the template sees them: transformers
copies reasoning_content under its other names first), tools?, documents?,
add_generation_prompt, bos_token, eos_token, kwargs? (extra template variables such
as enable_thinking or date_string), and either text (the expected output) or error
({kind, message}: kind "raise" for raise_exception, whose message must match, or
the Python exception class for other template errors, where any error is accepted)}.

strftime_now is pinned to NOW (2024-07-26 12:00:00) so templates that print today's
date (Llama 3.1+) render the same every time; the Lua test passes the same instant.

The template strings are data: the models' own chat_template strings as copied into
public repositories (see MANIFEST; nothing is downloaded by this script).

Usage:  pip install transformers jinja2
        python3 tests/parity/make_jinja_reference.py
"""

import datetime as real_datetime
import json
import os
import sys

import jinja2
import transformers
from transformers.utils import chat_template_utils

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.normpath(os.path.join(HERE, "..", "fixtures", "jinja"))
TEMPLATES = os.path.join(FIX, "templates")

NOW = real_datetime.datetime(2024, 7, 26, 12, 0, 0)
NOW_EPOCH = int(NOW.replace(tzinfo=real_datetime.timezone.utc).timestamp())

AX = "axolotl-ai-cloud/axolotl src/axolotl/utils/chat_templates/templates/{}.jinja (the model's chat_template as vendored there; axolotl adds {{% generation %}} markers to some)"
CZ = "chujiezheng/chat_templates chat_templates/{}.jinja (a community-maintained template for the model family, not the model's own tokenizer_config.json string)"
G4 = "nomic-ai/gpt4all gpt4all-chat/src/jinja_replacements.cpp: the 'original' template (the GGUF's tokenizer.chat_template) GPT4All recognises in {}"
REF = "tests/fixtures/chat/reference.json ({}), itself copied from the model's tokenizer_config.json / GGUF"

MANIFEST = [
    ("ref_smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF tokenizer.chat_template)", REF.format("smollm2")),
    ("ref_qwen2", "Qwen/Qwen2-0.5B-Instruct", REF.format("qwen2")),
    ("ref_chatml_openhermes", "teknium/OpenHermes-2.5-Mistral-7B (ChatML)", REF.format("chatml")),
    ("ref_llama3", "meta-llama/Meta-Llama-3-8B-Instruct", REF.format("llama3")),
    ("ref_llama2", "meta-llama/Llama-2-7b-chat-hf", REF.format("llama2")),
    ("ref_mistral_v02", "mistralai/Mistral-7B-Instruct-v0.2", REF.format("mistral")),
    ("ref_mistral_v01", "mistralai/Mistral-7B-Instruct-v0.1 (original)", REF.format("mistral_legacy")),
    ("ref_gemma", "google/gemma-7b-it", REF.format("unknown: gemma")),
    ("ref_mixtral", "mistralai/Mixtral-8x7B-Instruct-v0.1", REF.format("unknown: mixtral")),
    ("axolotl_aya", "CohereForAI/aya-expanse", AX.format("aya")),
    ("axolotl_cohere", "CohereForAI/c4ai-command-r-v01", AX.format("cohere")),
    ("axolotl_command_a", "CohereLabs/c4ai-command-a-03-2025", AX.format("command_a")),
    ("axolotl_command_a_rag", "CohereLabs/c4ai-command-a-03-2025 (RAG template)", AX.format("command_a_rag")),
    ("axolotl_command_a_tool_use", "CohereLabs/c4ai-command-a-03-2025 (tool_use template)", AX.format("command_a_tool_use")),
    ("axolotl_deepseek_v2", "deepseek-ai/DeepSeek-V2-Chat", AX.format("deepseek_v2")),
    ("axolotl_deepseek_v3", "deepseek-ai/DeepSeek-V3 / DeepSeek-R1", AX.format("deepseek_v3")),
    ("axolotl_exaone", "LGAI-EXAONE/EXAONE-3.5", AX.format("exaone")),
    ("axolotl_exaone4", "LGAI-EXAONE/EXAONE-4.0", AX.format("exaone4")),
    ("axolotl_falcon_h1", "tiiuae/Falcon-H1-*-Instruct", AX.format("falcon_h1")),
    ("axolotl_gemma", "google/gemma-2-*-it", AX.format("gemma")),
    ("axolotl_gemma3", "google/gemma-3-*-it", AX.format("gemma3")),
    ("axolotl_gemma3n", "google/gemma-3n-*-it", AX.format("gemma3n")),
    ("axolotl_gemma4", "google/gemma-4", AX.format("gemma4")),
    ("axolotl_jamba", "ai21labs/AI21-Jamba-1.5", AX.format("jamba")),
    ("axolotl_llama3", "meta-llama/Meta-Llama-3-8B-Instruct (content-list aware variant)", AX.format("llama3")),
    ("axolotl_llama3_2_vision", "meta-llama/Llama-3.2-11B-Vision-Instruct (Llama 3.1+ format, tools)", AX.format("llama3_2_vision")),
    ("axolotl_llama4", "meta-llama/Llama-4-Scout-17B-16E-Instruct", AX.format("llama4")),
    ("axolotl_llava", "llava-hf/llava-1.5", AX.format("llava")),
    ("axolotl_metharme", "PygmalionAI/metharme", AX.format("metharme")),
    ("axolotl_mistral_v1", "mistralai/Mistral-7B-Instruct-v0.1 (v1 tokenizer)", AX.format("mistral_v1")),
    ("axolotl_mistral_v2v3", "mistralai/Mistral-7B-Instruct-v0.3 (v3 tokenizer, tool calling)", AX.format("mistral_v2v3")),
    ("axolotl_mistral_v3_tekken", "mistralai/Mistral-Nemo-Instruct-2407 (v3 tekken, tool calling)", AX.format("mistral_v3_tekken")),
    ("axolotl_mistral_v7_tekken", "mistralai/Mistral-Small-24B-Instruct-2501 (v7 tekken, tool calling)", AX.format("mistral_v7_tekken")),
    ("axolotl_nemotron_h", "nvidia/Nemotron-H", AX.format("nemotron_h")),
    ("axolotl_phi_3", "microsoft/Phi-3-mini-4k-instruct", AX.format("phi_3")),
    ("axolotl_phi_35", "microsoft/Phi-3.5-mini-instruct", AX.format("phi_35")),
    ("axolotl_phi_4", "microsoft/Phi-4-reasoning", AX.format("phi_4")),
    ("axolotl_pixtral", "mistralai/Pixtral-12B", AX.format("pixtral")),
    ("axolotl_qwen2_vl", "Qwen/Qwen2-VL-*-Instruct", AX.format("qwen2_vl")),
    ("axolotl_qwen3", "Qwen/Qwen3-* (thinking, tools)", AX.format("qwen3")),
    ("axolotl_qwen3_5", "Qwen/Qwen3.5", AX.format("qwen3_5")),
    ("axolotl_qwen_25", "Qwen/Qwen2.5-*-Instruct (tools)", AX.format("qwen_25")),
    ("cz_amberchat", "LLM360/AmberChat", CZ.format("amberchat")),
    ("cz_chatqa", "nvidia/Llama3-ChatQA-1.5", CZ.format("chatqa")),
    ("cz_falcon-instruct", "tiiuae/falcon-7b-instruct", CZ.format("falcon-instruct")),
    ("cz_granite-3.0-instruct", "ibm-granite/granite-3.0-*-instruct", CZ.format("granite-3.0-instruct")),
    ("cz_openchat-3.5", "openchat/openchat_3.5", CZ.format("openchat-3.5")),
    ("cz_phi-3-small", "microsoft/Phi-3-small", CZ.format("phi-3-small")),
    ("cz_saiga", "IlyaGusev/saiga", CZ.format("saiga")),
    ("cz_solar-instruct", "upstage/SOLAR-10.7B-Instruct", CZ.format("solar-instruct")),
    ("cz_vicuna", "lmsys/vicuna-7b-v1.5", CZ.format("vicuna")),
    ("cz_zephyr", "HuggingFaceH4/zephyr-7b-beta", CZ.format("zephyr")),
    ("gpt4all_phi35_mini", "microsoft/Phi-3.5-mini-instruct (GGUF)", G4.format("Phi-3.5-mini-instruct-Q4_0.gguf")),
    ("gpt4all_deepseek_r1_distill_qwen", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B (GGUF)", G4.format("DeepSeek-R1-Distill-Qwen-7B-Q4_0.gguf")),
    ("gpt4all_gemma2_9b_it", "google/gemma-2-9b-it (GGUF)", G4.format("gemma-2-9b-it-Q4_0.gguf")),
    ("gpt4all_ghost_7b", "ghost-x/ghost-7b-v0.9.1 (GGUF)", G4.format("ghost-7b-v0.9.1-Q4_0.gguf")),
    ("gpt4all_granite_31", "ibm-granite/granite-3.1-8b-instruct (GGUF; tools, documents)", G4.format("granite-3.1-8b-instruct-Q4_0.gguf")),
    ("gpt4all_hermes3_chatml", "NousResearch/Hermes-3-Llama-3.2-3B (GGUF, ChatML)", G4.format("Hermes-3-Llama-3.2-3B.Q4_0.gguf")),
    ("gpt4all_llama32_instruct", "meta-llama/Llama-3.2-1B-Instruct / 3B (GGUF; tools, strftime_now)", G4.format("Llama-3.2-1B-Instruct-Q4_0.gguf")),
    ("gpt4all_llama33_70b_instruct", "meta-llama/Llama-3.3-70B-Instruct (GGUF; tools)", G4.format("Llama-3.3-70B-Instruct-Q4_0.gguf")),
    ("gpt4all_discoleo_llama3", "DiscoResearch/Llama3-DiscoLeo-Instruct-8B-32k-v0.1 (GGUF)", G4.format("Llama3-DiscoLeo-Instruct-8B-32k-v0.1-Q4_0.gguf")),
    ("gpt4all_llama31_8b_instruct", "meta-llama/Meta-Llama-3.1-8B-Instruct (GGUF, 128k)", G4.format("Meta-Llama-3.1-8B-Instruct-128k-Q4_0.gguf")),
    ("gpt4all_llama3_8b_instruct", "meta-llama/Meta-Llama-3-8B-Instruct (GGUF)", G4.format("Meta-Llama-3-8B-Instruct.Q4_0.gguf")),
    ("gpt4all_mistral_nemo", "mistralai/Mistral-Nemo-Instruct-2407 (GGUF; tools)", G4.format("Mistral-Nemo-Instruct-2407-Q4_0.gguf")),
    ("gpt4all_nous_hermes2_mistral", "NousResearch/Nous-Hermes-2-Mistral-7B-DPO (GGUF, ChatML)", G4.format("Nous-Hermes-2-Mistral-7B-DPO.Q4_0.gguf")),
    ("gpt4all_occiglot", "occiglot/occiglot-7b-de-en-instruct (GGUF)", G4.format("occiglot-7b-de-en-instruct.Q4_0.gguf")),
    ("gpt4all_olmoe_0125", "allenai/OLMoE-1B-7B-0125-Instruct (GGUF)", G4.format("OLMoE-1B-7B-0125-Instruct-Q4_0.gguf")),
    ("gpt4all_olmoe_0924", "allenai/OLMoE-1B-7B-0924-Instruct (GGUF)", G4.format("OLMoE-1B-7B-0924-Instruct-Q4_0.gguf")),
    ("gpt4all_phi31_mini_128k", "microsoft/Phi-3-mini-128k-instruct (\"Phi-3.1\", GGUF)", G4.format("Phi-3.1-mini-128k-instruct-Q4_0.gguf")),
    ("gpt4all_phi3_mini_4k", "microsoft/Phi-3-mini-4k-instruct (GGUF)", G4.format("Phi-3-mini-4k-instruct.Q4_0.gguf")),
    ("gpt4all_qwen2_instruct", "Qwen/Qwen2-1.5B-Instruct / 72B (GGUF)", G4.format("qwen2-1_5b-instruct-q4_0.gguf")),
    ("minja_qwen3_coder", "Qwen/Qwen3-Coder-30B-A3B-Instruct (tools, XML tool calls)", "google/minja tests_files/Qwen-Qwen3-Coder-30B-A3B-Instruct.jinja (the model's chat_template)"),
]

# ---------------------------------------------------------------------------
# conversations

SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in one line."}
U1 = {"role": "user", "content": "What is two plus two?"}
A1 = {"role": "assistant", "content": "Four, of course."}
U2 = {"role": "user", "content": "Say it in French, with an accent: café?"}
A2 = {"role": "assistant", "content": "C'est « quatre », voilà."}
U_WS = {"role": "user", "content": "  Leading and trailing spaces, \"quotes\", a tab\tand\nnewlines.\n\n"}
A_WS = {"role": "assistant", "content": "\nA reply with emoji 🙂, CJK 漢字 and a backslash \\ .  "}
A_THINK = {"role": "assistant", "content": "<think>\nThe user wants a sum.\n</think>\n\nFour."}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "The city, e.g. Paris"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["location"],
            },
        },
    }
]
TOOL_CALL = {
    "role": "assistant",
    "content": "",
    "tool_calls": [
        {
            "id": "call12345",
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}},
        }
    ],
}
TOOL_RESULT = {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "{\"temperature\": 22}"}
A_TOOL = {"role": "assistant", "content": "It is 22 °C in Paris."}
U_TOOL = {"role": "user", "content": "What's the weather in Paris?"}

DOCUMENTS = [
    {"title": "Tides", "text": "Tides are caused by the Moon."},
    {"title": "Sun", "text": "The Sun is a star."},
]

BASE_CASES = [
    ("single_gen", [U1], True),
    ("system_multi", [SYSTEM, U1, A1, U2, A2], False),
    ("system_multi_gen", [SYSTEM, U1, A1, U2], True),
    ("no_system_multi", [U1, A1, U2, A2], False),
    ("no_system_gen_after_assistant", [U1, A1], True),
    ("whitespace_unicode", [U_WS, A_WS], False),
    ("empty", [], True),
]


def cases_for(name, template):
    out = []
    for case, msgs, gen in BASE_CASES:
        out.append({"case": case, "messages": msgs, "add_generation_prompt": gen})
    if "think" in template:
        out.append({"case": "thinking", "messages": [U1, A_THINK, U2, A2], "add_generation_prompt": False})
    if "tools" in template or "tool_calls" in template:
        out.append({"case": "tools", "messages": [U_TOOL], "tools": TOOLS, "add_generation_prompt": True})
        out.append({"case": "tool_calls", "messages": [SYSTEM, U_TOOL, TOOL_CALL, TOOL_RESULT, A_TOOL],
                    "tools": TOOLS, "add_generation_prompt": False})
    if "documents" in template:
        out.append({"case": "documents", "messages": [U1], "documents": DOCUMENTS, "add_generation_prompt": True})
    if "tool_calls" in template:
        string_args = json.loads(json.dumps(TOOL_CALL))
        string_args["tool_calls"][0]["function"]["arguments"] = "{\"location\": \"Paris\"}"
        out.append({"case": "tool_calls_string_arguments", "messages": [U_TOOL, string_args, TOOL_RESULT, A_TOOL],
                    "tools": TOOLS, "add_generation_prompt": True})
    if "enable_thinking" in template:
        out.append({"case": "thinking_off", "messages": [U1, A1, U2], "add_generation_prompt": True,
                    "kwargs": {"enable_thinking": False}})
    if "reasoning_content" in template:
        out.append({"case": "reasoning_content",
                    "messages": [U1, {"role": "assistant", "content": "Four.", "reasoning_content": "2 + 2 = 4."}, U2,
                                 {"role": "assistant", "content": "Quatre.", "reasoning_content": "French: quatre."}],
                    "add_generation_prompt": False})
    if "is string" in template or "is not string" in template or "['text']" in template:
        parts = {"role": "user", "content": [{"type": "text", "text": "Describe "}, {"type": "text", "text": "this."}]}
        out.append({"case": "content_parts", "messages": [parts, A1], "add_generation_prompt": False})
    if "date_string" in template:
        out.append({"case": "date_string", "messages": [SYSTEM, U1], "add_generation_prompt": True,
                    "kwargs": {"date_string": "01 Jan 2025"}})
    return out


class FixedDatetime(real_datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return NOW


def template_view(messages):
    """The messages as the template sees them: transformers copies a message's
    reasoning under its other names (_alias_reasoning_fields) before rendering."""
    return chat_template_utils._alias_reasoning_fields(json.loads(json.dumps(messages)))


def render(template, c, bos, eos):
    kwargs = {"bos_token": bos, "eos_token": eos}
    kwargs.update(c.get("kwargs", {}))
    try:
        rendered, _ = chat_template_utils.render_jinja_template(
            conversations=[c["messages"]],
            tools=c.get("tools"),
            documents=c.get("documents"),
            chat_template=template,
            add_generation_prompt=c["add_generation_prompt"],
            **kwargs,
        )
        return {"text": rendered[0]}
    except jinja2.exceptions.TemplateError as e:
        kind = "raise" if type(e) is jinja2.exceptions.TemplateError else type(e).__name__
        return {"error": {"kind": kind, "message": str(e)}}
    except Exception as e:  # TypeError, ValueError ... inside the template
        return {"error": {"kind": type(e).__name__, "message": str(e)}}


def main():
    chat_template_utils.datetime = FixedDatetime  # strftime_now reads this name
    manifest, cases = [], []
    for name, model, source in MANIFEST:
        path = os.path.join(TEMPLATES, name + ".jinja")
        with open(path, "r", encoding="utf-8", newline="") as f:
            template = f.read()
        manifest.append({"name": name, "file": "templates/" + name + ".jinja", "model": model, "source": source})
        for c in cases_for(name, template):
            res = render(template, c, "<s>", "</s>")
            rec = {"template": name, "case": c["case"], "messages": template_view(c["messages"]),
                   "add_generation_prompt": c["add_generation_prompt"], "bos_token": "<s>", "eos_token": "</s>"}
            for k in ("tools", "documents", "kwargs"):
                if k in c:
                    rec[k] = c[k]
            rec.update(res)
            cases.append(rec)
    listed = {n + ".jinja" for n, _, _ in MANIFEST}
    stray = sorted(set(os.listdir(TEMPLATES)) - listed)
    if stray:
        sys.exit("templates without a manifest entry: " + ", ".join(stray))
    with open(os.path.join(FIX, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=1)
        f.write("\n")
    ref = {
        "generator": "tests/parity/make_jinja_reference.py",
        "versions": {"transformers": transformers.__version__, "jinja2": jinja2.__version__},
        "now": NOW_EPOCH,
        "cases": cases,
    }
    with open(os.path.join(FIX, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(ref, f, ensure_ascii=False, indent=1)
        f.write("\n")
    n_err = sum(1 for c in cases if "error" in c)
    print(f"{len(manifest)} templates, {len(cases)} cases ({n_err} expected errors)")


if __name__ == "__main__":
    main()
