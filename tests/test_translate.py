"""The Ollama translation's pure parts: SSE reading, options, messages, plans, answers, model descriptions."""

from __future__ import annotations

import json
from typing import Any

import ollama
import pytest
from structlog.testing import capture_logs

from llmbalancer.errors import ProxyError
from llmbalancer.translate import requests
from llmbalancer.translate.catalog import human_number, model_facts, ps_entry, show_answer, tag_entry
from llmbalancer.translate.errors import backend_message
from llmbalancer.translate.messages import openai_messages
from llmbalancer.translate.options import sampling_params
from llmbalancer.translate.replies import BackendAnswerError, OllamaAnswer, counts
from llmbalancer.translate.sse import SseOverflow, SseReader

TIMINGS = {"cache_n": 24, "prompt_n": 8, "prompt_ms": 40.5, "predicted_n": 5, "predicted_ms": 30.25}


def test_sse_events_are_read_whatever_the_reads_and_line_endings() -> None:
    stream = b'data: {"a":1}\n\ndata: {"b":\r\ndata: 2}\r\n\r\n: comment\nevent: x\ndata: [DONE]\n\n'
    whole = SseReader().feed(stream)
    assert whole == [b'{"a":1}', b'{"b":\n2}', b"[DONE]"]
    reader = SseReader()
    pieces = [reader.feed(stream[i : i + 3]) for i in range(0, len(stream), 3)]
    assert [event for piece in pieces for event in piece] == whole
    unterminated = SseReader()
    assert unterminated.feed(b'data: {"last":true}') == [] and unterminated.finish() == [b'{"last":true}']
    with pytest.raises(SseOverflow):
        SseReader(max_event=10).feed(b"data: " + b"x" * 20)


def test_options_go_under_each_backends_names_and_those_without_one_are_refused() -> None:
    options = {"temperature": 0.1, "top_k": 5, "repeat_penalty": 1.2, "num_predict": 9, "stop": "END", "min_p": 0.1,
               "mirostat": 1, "mirostat_eta": 0.2, "num_keep": 4, "typical_p": 0.7}
    assert sampling_params(options, "llamacpp", "b") == {
        "temperature": 0.1, "top_k": 5, "repeat_penalty": 1.2, "max_tokens": 9, "stop": ["END"], "min_p": 0.1,
        "mirostat": 1, "mirostat_eta": 0.2, "n_keep": 4, "typical_p": 0.7,
    }
    plain = {k: v for k, v in options.items() if k not in ("mirostat", "mirostat_eta", "typical_p")}
    assert sampling_params(plain, "openai", "b") == {
        "temperature": 0.1, "top_k": 5, "repetition_penalty": 1.2, "max_tokens": 9, "stop": ["END"], "min_p": 0.1,
    }  # num_keep: nothing to keep where the context never shifts
    for name, value in (("mirostat", 2), ("typical_p", 0.5), ("repeat_last_n", 32)):
        with pytest.raises(ProxyError) as refused:
            sampling_params({name: value, "repeat_penalty": 1.1}, "openai", "gpu7")
        assert refused.value.status == 400 and repr(name) in refused.value.message and "gpu7" in refused.value.message
    with pytest.raises(ProxyError, match="'tfs_z'"):
        sampling_params({"tfs_z": 0.9}, "llamacpp", "b")
    no_effect = {"tfs_z": 1.0, "mirostat": 0, "mirostat_tau": 5.0, "penalize_newline": False, "typical_p": 1,
                 "repeat_last_n": 64, "num_predict": -1}
    assert sampling_params(no_effect, "openai", "b") == {}


def test_runtime_and_unknown_options_are_ignored_with_a_debug_log() -> None:
    with capture_logs() as logs:
        assert sampling_params({"num_ctx": 8192, "num_gpu": 99, "flash": True}, "llamacpp", "b") == {}
    assert [(e["event"], e["option"]) for e in logs] == [
        ("ollama_option_ignored", "num_ctx"), ("ollama_option_ignored", "num_gpu"), ("ollama_option_ignored", "flash")
    ]
    assert all(e["log_level"] == "debug" for e in logs)


def test_messages_carry_images_as_data_urls_and_tool_results_tied_to_their_calls() -> None:
    converted = openai_messages([
        {"role": "user", "content": "What is it?", "images": ["iVBORw0KGgoAAA", "/9j/4AAQ"]},
        {"role": "assistant", "content": "", "thinking": "hmm", "tool_calls": [
            {"function": {"name": "a", "arguments": {"x": 1}}}, {"function": {"name": "b", "arguments": {}}}]},
        {"role": "tool", "content": "B's result", "tool_name": "b"},
        {"role": "tool", "content": "A's result", "tool_name": "a"},
    ])
    assert converted[0]["content"] == [
        {"type": "text", "text": "What is it?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAA"}},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
    ]
    calls = converted[1]["tool_calls"]
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("call_1_0", "a", {"x": 1}), ("call_1_1", "b", {})
    ]
    assert converted[1]["reasoning_content"] == "hmm"
    assert [m["tool_call_id"] for m in converted[2:]] == ["call_1_1", "call_1_0"]
    with pytest.raises(ProxyError):
        openai_messages([{"content": "no role"}])


def test_plans_say_where_each_ollama_request_goes() -> None:
    chat = requests.chat({"model": "m", "messages": [{"role": "user", "content": "hi"}], "format": "json"},
                         "openai", "b")
    assert (chat.path, chat.streamed, chat.upstream, chat.shape) == ("/v1/chat/completions", True, "chat", "chat")
    assert chat.body is not None and chat.body["stream_options"] == {"include_usage": True}
    assert chat.body["response_format"] == {"type": "json_object"}
    templated = requests.generate({"model": "m", "prompt": "hi", "system": "be brief", "stream": False},
                                  "llamacpp", "b")
    assert templated.path == "/v1/chat/completions" and templated.body is not None and not templated.streamed
    assert templated.body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    raw = requests.generate({"model": "m", "prompt": "hi", "raw": True}, "llamacpp", "b")
    assert (raw.path, raw.upstream) == ("/v1/completions", "text") and raw.body is not None
    assert "stream_options" not in raw.body  # llama.cpp's finish chunk carries timings unasked
    infill = requests.generate({"model": "m", "prompt": "a", "suffix": "c", "options": {"num_predict": 3}},
                               "llamacpp", "b")
    assert infill.path == "/infill" and infill.body is not None
    assert (infill.body["input_prefix"], infill.body["input_suffix"], infill.body["n_predict"]) == ("a", "c", 3)
    suffixed = requests.generate({"model": "m", "prompt": "a", "suffix": "c"}, "openai", "b")
    assert suffixed.path == "/v1/completions" and suffixed.body is not None and suffixed.body["suffix"] == "c"
    for field, value in (("template", "{{ .Prompt }}"), ("context", [1, 2])):
        with pytest.raises(ProxyError, match=field):
            requests.generate({"model": "m", "prompt": "hi", field: value}, "llamacpp", "b")
    with pytest.raises(ProxyError, match="format"):
        requests.chat({"model": "m", "messages": [{"role": "user", "content": "x"}], "format": "yaml"}, "openai", "b")
    assert requests.chat({"model": "m", "messages": []}, "llamacpp", "b").load_reason == "load"
    with pytest.raises(ProxyError, match="model is required"):
        requests.chat({"messages": [{"role": "user", "content": "x"}]}, "llamacpp", "b")
    assert requests.generate({"model": "m", "keep_alive": 0}, "llamacpp", "b").load_reason == "unload"
    embed = requests.embed({"model": "m", "input": ["a", "b"], "dimensions": 8}, "embed")
    assert embed.body == {"model": "m", "input": ["a", "b"], "encoding_format": "float", "dimensions": 8}


def _answer(shape: str = "chat", upstream: str = "chat", streamed: bool = True) -> OllamaAnswer:
    plan = requests.Plan("POST", "/", {}, streamed, upstream, shape)  # type: ignore[arg-type]
    return OllamaAnswer(plan, "m", 0.0)


def test_a_stream_becomes_one_object_per_token_then_gathered_tool_calls_then_the_counts() -> None:
    answer = _answer()
    events: list[dict[str, Any]] = [
        {"choices": [{"delta": {"role": "assistant", "content": None}, "finish_reason": None}]},
        {"choices": [{"delta": {"content": "Hi"}, "finish_reason": None}]},
        {"choices": [{"delta": {"reasoning_content": "think"}, "finish_reason": None}]},
        {"choices": [{"delta": {"tool_calls": [
            {"index": 0, "id": "c1", "type": "function", "function": {"name": "get", "arguments": ""}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": ' "Paris"}'}}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}], "timings": TIMINGS},
    ]
    told = [obj for event in events for obj in answer.event(event)]
    assert [o["message"] for o in told] == [
        {"role": "assistant", "content": "Hi"}, {"role": "assistant", "content": "", "thinking": "think"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "function": {"index": 0, "name": "get", "arguments": {"city": "Paris"}}}]},
    ]
    final = answer.final()
    assert final["done"] is True and final["done_reason"] == "stop"
    assert {k: final[k] for k in ("prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration")} == {
        "prompt_eval_count": 8, "prompt_eval_duration": 40_500_000, "eval_count": 5, "eval_duration": 30_250_000
    }
    ollama.ChatResponse.model_validate(final)
    for obj in told:
        ollama.ChatResponse.model_validate(obj)


def test_counts_come_from_timings_else_usage_and_are_left_out_when_unknown() -> None:
    usage = {"prompt_tokens": 30, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 24}}
    assert counts(usage, None) == {"prompt_eval_count": 6, "eval_count": 4}
    assert counts(None, None) == {}
    assert counts({"prompt_tokens": 30}, {"predicted_n": 2, "prompt_n": 3})["prompt_eval_count"] == 3


def test_whole_answers_generate_text_and_errors() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 1}
    told = _answer("generate", "text", streamed=False).whole(
        {"choices": [{"text": " Paris", "finish_reason": "length"}], "usage": usage}
    )
    assert told["response"] == " Paris" and told["done_reason"] == "length" and told["eval_count"] == 1
    ollama.GenerateResponse.model_validate(told)
    with pytest.raises(BackendAnswerError, match="bad things"):
        _answer().event({"error": {"message": "bad things"}})
    with pytest.raises(BackendAnswerError, match="not a JSON object"):
        _answer(streamed=False).whole({"choices": [{"message": {"tool_calls": [
            {"id": "x", "function": {"name": "f", "arguments": "[1, 2]"}}]}, "finish_reason": "tool_calls"}]})
    logprobs = {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105],
                             "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105]}]}]}
    (piece,) = _answer().event({"choices": [{"delta": {"content": "Hi"}, "logprobs": logprobs}]})
    assert piece["logprobs"] == [{"token": "Hi", "logprob": -0.1, "top_logprobs": [{"token": "Hi", "logprob": -0.1}]}]
    embedded = _answer("embed", "embed", streamed=False).embedded(
        {"data": [{"index": 1, "embedding": [2.0]}, {"index": 0, "embedding": [1.0]}], "usage": {"prompt_tokens": 2}}
    )
    assert embedded["embeddings"] == [[1.0], [2.0]] and embedded["prompt_eval_count"] == 2
    ollama.EmbedResponse.model_validate(embedded)


def test_models_are_described_from_what_backends_tell_and_the_client_accepts_them() -> None:
    assert [human_number(n) for n in (134_515_008, 135_000_000, 8_030_261_248, 7_000_000_000, 22_000, 12)] == [
        "134.52M", "135M", "8.0B", "7B", "22K", "12"
    ]
    llama = {
        "models": [{"model": "smollm2", "details": {"format": "gguf", "family": ""}}],
        "data": [{"id": "smollm2", "meta": {"size": 96576768, "n_params": 134515008, "n_ctx": 2048,
                                              "n_ctx_train": 8192, "ftype": "Q4_1"}}],
    }
    (facts, declared) = model_facts(llama, {"chat_template": "{{ x }}", "modalities": {"vision": True}},
                                    declared=["other"])
    assert (facts.size, facts.parameters, facts.quantization, facts.format, facts.family, facts.context) == (
        96576768, 134515008, "Q4_1", "gguf", None, 2048
    )
    assert declared.name == "other" and declared.size is None
    vllm = model_facts({"data": [{"id": "qwen", "max_model_len": 32768}]})[0]
    assert vllm.context == 32768 and vllm.size is None
    ollama.ListResponse.model_validate({"models": [tag_entry(f) for f in (facts, declared, vllm)]})
    ollama.ProcessResponse.model_validate({"models": [ps_entry(f) for f in (facts, declared, vllm)]})
    shown = ollama.ShowResponse.model_validate(show_answer(facts, {"chat_template": "{{ x }}",
                                                                   "modalities": {"vision": True}}, "gpu1"))
    assert shown.capabilities == ["completion", "vision"] and shown.template == "{{ x }}"
    assert shown.modelinfo == {"general.parameter_count": 134515008, "general.context_length": 2048,
                               "general.context_length_trained": 8192}


def test_a_backends_error_message_is_found_in_every_usual_shape() -> None:
    assert backend_message(b'{"error":{"code":400,"message":"too long","type":"x"}}', 400) == "too long"
    assert backend_message(b'{"error":"model \\"x\\" not found"}', 404) == 'model "x" not found'
    assert backend_message(b'{"object":"error","message":"vllm says no","code":400}', 400) == "vllm says no"
    assert backend_message(b'{"detail":"Not Found"}', 404) == "Not Found"
    assert backend_message(b"404 page not found\n", 404) == "404 page not found"
    assert backend_message(b"", 502) == "HTTP 502"
