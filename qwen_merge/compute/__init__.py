"""Compute: a plan's shards as pieces of bytes (`pieces`: spans copied unchanged, blocks computed), and the
arithmetic that makes the blocks (`arithmetic`, `blockquant`, `stream`: the only modules that import torch).

Imports `planning`, `inputs` and the top-level vocabulary.
"""
