"""The balancer's own HTTP routes (everything else is proxied): health, ``/llmhealth``, the snapshot and
monitor page, metrics, admin, the merged model lists and the Ollama surface.

May import: every package below it, through ``components.Components``; never ``app``.
"""
