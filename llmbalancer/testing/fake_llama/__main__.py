"""`python -m llmbalancer.testing.fake_llama --port P [...]`: see `cli`."""

import sys

from llmbalancer.testing.fake_llama.cli import main

if __name__ == "__main__":
    sys.exit(main())
