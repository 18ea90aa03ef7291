"""Ollama's API over backends that do not speak it: llama.cpp's server, llamafile, vLLM, any
OpenAI-compatible server.

Owns: which backends speak Ollama (``kinds``), the Ollama requests rewritten as OpenAI (or llama.cpp)
requests (``options``, ``messages``, ``requests``), their answers rewritten as Ollama's (``sse``,
``replies``), one translated attempt and its relay (``exchange``), the adapter the proxy asks per attempt
(``adapter``; the hook is ``relay/exchange.py``), Ollama's error shape (``errors``) and the model
descriptions of ``/api/tags``, ``/api/ps``, ``/api/show`` (``catalog``). Entered only from
``web/ollama.py``, for Ollama routes: the OpenAI routes never run it.
May import: ``relay``, ``scheduling``, ``fleet``, ``config``, ``errors``.
"""
