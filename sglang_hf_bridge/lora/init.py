"""Fresh adapter weights initialised as PEFT's ``LoraLayer.reset_lora_parameters`` does."""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
from torch import nn

from ..errors import UnsupportedAdapterError
from ..sglang_models.layout import module_dims
from ..sglang_models.weight_map import weight_map_for
from .config import AdapterSpec


def init_adapter_weights(spec: AdapterSpec, init_lora_weights,
                         model_config) -> Dict[Tuple[int, str], Tuple[torch.Tensor, torch.Tensor]]:
    """True: A kaiming-uniform(a=sqrt(5)), B zeros. "gaussian": A ~ N(0, 1/r), B zeros.
    False: both as nn.Linear's default (B != 0, for tests and debugging).

    Drawn as PEFT draws them -- target by target in the model's module order, each A and B first
    built as ``nn.Linear`` (a kaiming draw each), then reset -- so the same seed gives PEFT's
    tensors exactly."""
    if init_lora_weights not in (True, False, "gaussian"):
        raise UnsupportedAdapterError(
            f"init_lora_weights={init_lora_weights!r} is not supported by add_adapter "
            "(use True, False or 'gaussian'; load adapters initialised elsewhere with load_adapter)"
        )
    order = {module: i for i, (module, _) in enumerate(weight_map_for(model_config).lora_modules)}
    weights = {}
    r = spec.rank
    for layer, module in sorted(spec.targets, key=lambda key: (key[0], order.get(key[1], len(order)), key[1])):
        fan_in, fan_out = module_dims(model_config, module)
        a, b = torch.empty(r, fan_in), torch.empty(fan_out, r)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear(in, r)'s own initialisation
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))  # nn.Linear(r, out)'s
        if init_lora_weights == "gaussian":
            nn.init.normal_(a, std=1 / r)
        elif init_lora_weights is True:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init_lora_weights is not False:
            nn.init.zeros_(b)
        weights[(layer, module)] = (a, b)
    return weights
