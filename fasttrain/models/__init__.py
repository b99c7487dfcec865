"""Model zoo: build a registered model by name with `create(name, **kwargs)`; `describe(name)` lists its arguments.
Renamed models keep their former names (`former_names()`; `canonical_name` maps one to the current name)."""

from fasttrain.models.airbench import Airbench94
from fasttrain.models.deepcnn import DeepCNN
from fasttrain.models.layers import Mul, PlainBlock, Residual, ResidualBlock, SkipConnectionBlock, conv_bn, conv_bn_relu
from fasttrain.models.registry import canonical_name, create, data_init, describe, former_names, names, register
from fasttrain.models.resnet import ResNet9FFCV, ResNet9Myrtle, ResNet18
from fasttrain.models.stats import count_params, evaluating, flops_per_image

__all__ = [
    "Airbench94",
    "DeepCNN",
    "Mul",
    "PlainBlock",
    "Residual",
    "ResNet9FFCV",
    "ResNet9Myrtle",
    "ResNet18",
    "ResidualBlock",
    "SkipConnectionBlock",
    "canonical_name",
    "conv_bn",
    "conv_bn_relu",
    "count_params",
    "create",
    "data_init",
    "describe",
    "evaluating",
    "flops_per_image",
    "former_names",
    "names",
    "register",
]
