"""Test and benchmark helpers for llmbalancer (the llama.cpp-shaped fake server lives in `fake_llama`)."""
