"""Inputs: what is on disk or on the Hub, read and checked — safetensors headers, a base checkpoint, a PEFT
adapter, Hub repos and their downloads, positioned reads of tensor bytes, input-file hashes.

Imports only the package's top-level vocabulary (errors, dtypes, files, options, units); nothing here plans.
"""
