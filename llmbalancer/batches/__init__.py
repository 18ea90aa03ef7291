"""OpenAI's Files and Batches API over the fleet: uploaded JSONL files of requests run as batches on the
slots interactive users leave idle, durably.

Owns: files on disk and the SQLite store under ``batch.dir`` (``database.py``, one thread; ``store.py``;
``files.py``), input validation (``validation.py``, ``validating.py``), the runner service that pours
batch lines into idle slots through the claim protocol (``runner.py``, ``gate.py``, ``sender.py``,
``active.py``), the output and error files (``finalize.py``), and the API's operations (``api.py``).
May import: ``scheduling``, ``fleet``, ``config``, ``relay``, ``errors``, ``service``; never ``web``,
``observe`` or the composition root.
"""

from llmbalancer.batches.api import BatchApi
from llmbalancer.batches.runner import BatchRunner

__all__ = ["BatchApi", "BatchRunner"]
