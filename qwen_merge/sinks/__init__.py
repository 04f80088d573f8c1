"""Sinks: where a run's pieces go — the local folder (staging, the shard writer, resume state, publishing).

Imports `compute` (pieces only, never torch at import), `planning`, `inputs` and the top-level vocabulary.
"""
