"""Test and benchmark helpers for llmbalancer (the llama.cpp-shaped fake server lives in `fake_llama`).

Imports nothing of the daemon: the fake stands beside it as a real backend would.
"""
