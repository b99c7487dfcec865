"""Model zoo: build a registered model by name with `create(name, **kwargs)`; `describe(name)` lists its arguments."""

from fasttrain.models.deepcnn import DeepCNN
from fasttrain.models.layers import Mul, PlainBlock, Residual, ResidualBlock, SkipConnectionBlock, conv_bn, conv_bn_relu
from fasttrain.models.registry import create, describe, names, register
from fasttrain.models.resnet import ResNet9, ResNet18
from fasttrain.models.stats import count_params, flops_per_image

__all__ = [
    "DeepCNN",
    "Mul",
    "PlainBlock",
    "Residual",
    "ResNet9",
    "ResNet18",
    "ResidualBlock",
    "SkipConnectionBlock",
    "conv_bn",
    "conv_bn_relu",
    "count_params",
    "create",
    "describe",
    "flops_per_image",
    "names",
    "register",
]
