"""Test and benchmark helpers for llmbalancer: the llama.cpp-shaped fake server (the `fake_llama`
package, one module per concern) and its Ollama mode (`fake_ollama`). What they mimic of the real
server is written down in docs/llama-server-api.md.

Imports nothing of the daemon: the fake stands beside it as a real backend would.
"""
