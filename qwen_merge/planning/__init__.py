"""Planning: from headers and JSON to a frozen `MergePlan` — names, targets, ties, experts, the output's layout,
its identity (the manifest) and the memory it will take. Never reads tensor bytes, never imports torch.

Imports `inputs` and the top-level vocabulary.
"""
