# Copied from PEFT 0.21.2, tests/test_custom_models.py (https://github.com/huggingface/peft),
# Copyright 2023-present the HuggingFace Inc. team, licensed under the Apache License, Version 2.0
# (http://www.apache.org/licenses/LICENSE-2.0). Changes: only the model classes and the single-adapter
# `LoraConfig` rows of TEST_CASES are kept; MockTransformerWrapper.from_pretrained became `build_model`;
# the rows are (name, model id, config kwargs) with the config class dropped (it is always LoraConfig); the
# nested config objects (KasaConfig(), VeloraConfig(...), ...) are written `Lazy("KasaConfig", ...)` and
# transformers' Conv1D is imported where it is used, so that listing the cases imports neither PEFT nor
# transformers (the test collection of the fast tier).
"""PEFT's own LoRA test matrix, as data: the tiny custom models and the LoraConfig cases that
test_peft_matrix.py runs through qwen_merge.

All 46 rows of TEST_CASES whose config class is `LoraConfig` are here, in PEFT's order (PEFT 0.21.2 has no
other single-adapter LoRA rows in that file: MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES are two-adapter cases, and
TinyLora / RandLora / UniLora / AdaLora / ... rows use other config classes and peft_types). None is left out.
"""

from __future__ import annotations

import torch
from torch import nn


class Lazy:
    """A PEFT config object of a case, made when the case is built (`resolved`)."""

    def __init__(self, name: str, **kwargs) -> None:
        self.name, self.kwargs = name, kwargs

    def build(self):
        import peft
        from peft.tuners.lora.config import BdLoraConfig

        return (BdLoraConfig if self.name == "BdLoraConfig" else getattr(peft, self.name))(**self.kwargs)


def resolved(kwargs: dict) -> dict:
    """A case's LoraConfig keyword arguments with its `Lazy` config objects made."""
    return {key: value.build() if isinstance(value, Lazy) else value for key, value in kwargs.items()}


class MLP(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        X = self.lin0(X)
        X = self.relu(X)
        X = self.drop(X)
        X = self.lin1(X)
        X = self.sm(X)
        return X


class ModelEmbConv1D(nn.Module):
    def __init__(self, emb_size=100):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(emb_size, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = self.emb(X)
        X = self.conv1d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


class ModelConv1D(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(1, 1, 2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(9, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        X = X.reshape(-1, 1, 10)
        X = self.conv1d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


class ModelConv2D(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3, bias=bias)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        X = X.reshape(-1, 5, 3, 3)
        X = self.conv2d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


class ModelConv2DGroups(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        # groups is set as 8 since default r=8
        # hence to make r divisible by groups
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin1 = nn.Linear(16, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        X = X.flatten()
        X = self.lin0(X)
        X = X.reshape(2, 16, 3, 3)
        X = self.conv2d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin1(X)
        X = self.sm(X)
        return X


class ModelConv2DGroups2(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(12800, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        # Note: needs a different input shape, thus ignore original input
        X = torch.arange(9 * 16 * 20 * 20).view([9, 16, 20, 20]).to(self.conv2d.weight.device)
        X = X.to(self.dtype)
        X = self.conv2d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


class ModelConv3D(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv3d = nn.Conv3d(5, 10, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        # If necessary, convert from 2D image to 3D volume
        if X.dim() == 2:
            X = torch.stack([X] * 3, dim=-1)
        X = X.reshape(-1, 5, 3, 3, 3)
        X = self.conv3d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


class ModelMha(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        X, _ = self.mha(X, X, X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


class _LinearUsingParameter(nn.Module):
    # Linear layer equivalent
    def __init__(self, in_features, out_features, bias=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        if bias:
            self.bias = nn.Parameter(torch.ones(out_features))

    def forward(self, x):
        return x @ self.weight + self.bias


class MlpUsingParameters(nn.Module):
    # MLP that uses layers whose parameters need to be targeted with target_parameters
    def __init__(self, bias=True):
        super().__init__()

        self.lin0 = _LinearUsingParameter(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = _LinearUsingParameter(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        X = self.lin0(X)
        X = self.relu(X)
        X = self.drop(X)
        X = self.lin1(X)
        X = self.sm(X)
        return X


MODELS = {
    "MLP": MLP,
    "EmbConv1D": ModelEmbConv1D,
    "Conv1d": ModelConv1D,
    "Conv2d": ModelConv2D,
    "Conv2dGroups": ModelConv2DGroups,
    "Conv2dGroups2": ModelConv2DGroups2,
    "Conv3d": ModelConv3D,
    "MHA": ModelMha,
    "MlpUsingParameters": MlpUsingParameters,
}


def build_model(model_id: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """MockTransformerWrapper.from_pretrained: the seed is set so every call returns the same model."""
    torch.manual_seed(0)
    return MODELS[model_id]().to(dtype)


# (test name, model id, LoraConfig kwargs): the LoraConfig rows of TEST_CASES, in order.
LORA_CASES = [
    ("Vanilla MLP 1 LoRA", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LoRA", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LoRA", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LoRA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LoRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    (
        "Vanilla MLP 6 LoRA",
        "MLP",
        {
            "target_modules": ["lin0"],
            "lora_alpha": 4,
            "lora_dropout": 0.1,
        },
    ),
    ("Vanilla MLP 7 LoRA with DoRA", "MLP", {"target_modules": ["lin0"], "use_dora": True}),
    ("Vanilla MLP 8 LoRA with DoRA", "MLP", {"target_modules": ["lin0", "lin1"], "use_dora": True}),
    (
        "Vanilla MLP 1 LoRA with KaSA",
        "MLP",
        # lin1 is (20, 2), so with r=4 only lin0 can be targeted (KaSA requires r < min(in_features, out_features)).
        {"target_modules": ["lin0"], "kasa_config": Lazy("KasaConfig"), "r": 4},
    ),
    (
        "Vanilla MLP 1 LoRA with MiCA",
        "MLP",
        {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4},
    ),
    (
        "Vanilla MLP 9 LoRA with DoRA",
        "MLP",
        {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32},
    ),
    (
        "Vanilla MLP 10 LoRA with VeLoRA random",
        "MLP",
        {"target_modules": ["lin0"], "velora_config": Lazy("VeloraConfig", num_groups=2, init_type="random")},
    ),
    (
        "Vanilla MLP 11 LoRA with VeLoRA batch_average",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "velora_config": Lazy("VeloraConfig", num_groups=2, init_type="batch_average"),
        },
    ),
    (
        "Vanilla MLP 12 LoRA with VeLoRA batch_average_once",
        "MLP",
        {"target_modules": ["lin0"], "velora_config": Lazy("VeloraConfig", num_groups=2, init_type="batch_average_once")},
    ),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", {"target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"]}),
    (
        "Embedding + transformers Conv1D 1 DoRA",
        "EmbConv1D",
        {"target_modules": ["conv1d"], "use_dora": True},
    ),
    ("Embedding + transformers Conv1D 2 DoRA", "EmbConv1D", {"target_modules": ["emb"], "use_dora": True}),
    (
        "Embedding + transformers Conv1D 3 DoRA",
        "EmbConv1D",
        {"target_modules": ["emb", "conv1d"], "use_dora": True},
    ),
    (
        "Embedding + transformers Conv1D 1 LoRA trainable_tokens",
        "EmbConv1D",
        {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}},
    ),
    ("Conv1d LoRA", "Conv1d", {"target_modules": ["conv1d"]}),
    ("Conv1d LoRA with DoRA", "Conv1d", {"target_modules": ["conv1d"], "use_dora": True}),
    ("Conv2d 1 LoRA", "Conv2d", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 1 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d 2 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"], "use_dora": True}),
    ("Conv2d Groups LoRA", "Conv2dGroups", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LoRA", "Conv2dGroups2", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups LoRA with DoRA", "Conv2dGroups", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d Groups2 LoRA with DoRA", "Conv2dGroups2", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv3d 1 LoRA", "Conv3d", {"target_modules": ["conv3d"]}),
    ("Conv3d 2 LoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"]}),
    ("Conv3d 1 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d"], "use_dora": True}),
    ("Conv3d 2 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"], "use_dora": True}),
    # LoRA with lora_B bias enabled (note: embedding is not supported)
    # It's important to set lora_alpha != r to ensure that scaling is taken into account correctly
    (
        "Vanilla MLP 1 LoRA with lora_b bias",
        "MLP",
        {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32},
    ),
    (
        "Conv2d 1 LoRA with lora_b bias",
        "Conv2d",
        {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32},
    ),
    (
        "Conv3d 1 LoRA with lora_b bias",
        "Conv3d",
        {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32},
    ),
    ("MHA 1 LoRA", "MHA", {"target_modules": ["mha"]}),
    ("MHA 2 LoRA", "MHA", {"target_modules": ["mha", "lin0"]}),
    # targeting parameters directly
    ("MLP 1 using nn.Parameter LoRA", "MlpUsingParameters", {"target_parameters": ["lin0.weight"]}),
    (
        "MLP 2 using nn.Parameter LoRA",
        "MLP",
        {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]},
    ),
    #############
    # MonteCLoRA #
    #############
    (
        "Vanilla MLP 1 LoRA with Monteclora",
        "MLP",
        {
            "target_modules": ["lin0"],
            "monteclora_config": Lazy("MontecloraConfig", num_samples=2),
        },
    ),
    ###########
    # BD-LoRA #
    ###########
    (
        "BD-LoRA A only",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            # No `nblocks` here on purpose: exercise the default so the config default is covered.
            "use_bdlora": Lazy("BdLoraConfig", target_modules_bd_a=["lin0"], match_strict=False),
        },
    ),
    (
        "BD-LoRA B only",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": Lazy("BdLoraConfig", target_modules_bd_b=["lin1"], nblocks=2, match_strict=False),
        },
    ),
    (
        "BD-LoRA both A and B",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": Lazy("BdLoraConfig", target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2),
        },
    ),
]
