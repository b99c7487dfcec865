"""ResNet-9 in its two common forms — the network of FFCV's CIFAR example (`resnet9_ffcv`, the resnet9 recipe's)
and the wider Myrtle.ai DAWNBench net (`resnet9_myrtle`, formerly registered as `resnet9`) — and the standard
CIFAR ResNet-18."""

import torch
from torch import nn

from fasttrain.errors import ConfigError
from fasttrain.models.layers import Mul, Residual, ResidualBlock, conv_bn_relu
from fasttrain.models.registry import register


def _check_positive(model: str, **values: float) -> None:
    for arg, value in values.items():
        if value <= 0:
            raise ConfigError(f"{model}: {arg} must be positive, got {value}")


@register("resnet9_ffcv")
class ResNet9FFCV(nn.Sequential):
    """The network of FFCV's examples/cifar (2,274,880 parameters at width_mult 1):
    conv 64 -> 5x5 stride-2 conv 128 -> residual(2 x conv 128) -> conv 256 -> max-pool 2 -> residual(2 x conv 256)
    -> 3x3 conv to 128 without padding -> global max-pool -> bias-free linear, logits x `scale` (0.2).
    Every conv is conv-BN-ReLU without bias. Widths are 64/128/256 times `width_mult`."""

    def __init__(
        self, num_classes: int = 10, width_mult: float = 1.0, scale: float = 0.2, in_channels: int = 3
    ) -> None:
        _check_positive("resnet9_ffcv", num_classes=num_classes, width_mult=width_mult, scale=scale)
        c0, c1, c2 = (max(1, round(base * width_mult)) for base in (64, 128, 256))
        unpadded = nn.Sequential(nn.Conv2d(c2, c1, 3, padding=0, bias=False), nn.BatchNorm2d(c1), nn.ReLU(inplace=True))
        super().__init__(
            conv_bn_relu(in_channels, c0),
            conv_bn_relu(c0, c1, kernel=5, stride=2),
            Residual(nn.Sequential(conv_bn_relu(c1, c1), conv_bn_relu(c1, c1))),
            conv_bn_relu(c1, c2),
            nn.MaxPool2d(2),
            Residual(nn.Sequential(conv_bn_relu(c2, c2), conv_bn_relu(c2, c2))),
            unpadded,
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Linear(c1, num_classes, bias=False),
            Mul(scale),
        )


@register("resnet9_myrtle", former_names=("resnet9",))
class ResNet9Myrtle(nn.Module):
    """The Myrtle.ai DAWNBench ResNet-9 (6.57 M parameters): prep(64) -> layer1(128, pool, residual) ->
    layer2(256, pool) -> layer3(512, pool, residual) -> max-pool head. Wider at full resolution than the FFCV
    example's net (`resnet9_ffcv`) and about 1.3x its compute. Registered as `resnet9` until the FFCV net got its
    own name; `resnet9` still builds this net, so old configs and checkpoints keep meaning what they meant.

    Widths are 64/128/256/512 times `width_mult`. The linear head has no bias and its logits are multiplied by
    `scale` (0.125, Myrtle.ai's value). A small scale keeps the initial softmax soft, which the high learning
    rates of fast schedules rely on.
    """

    def __init__(
        self, num_classes: int = 10, width_mult: float = 1.0, scale: float = 0.125, in_channels: int = 3
    ) -> None:
        super().__init__()
        _check_positive(
            "resnet9_myrtle", num_classes=num_classes, width_mult=width_mult, scale=scale, in_channels=in_channels
        )
        c0, c1, c2, c3 = (max(1, round(base * width_mult)) for base in (64, 128, 256, 512))
        self.prep = conv_bn_relu(in_channels, c0)
        self.layer1 = nn.Sequential(
            *conv_bn_relu(c0, c1), nn.MaxPool2d(2), Residual(nn.Sequential(conv_bn_relu(c1, c1), conv_bn_relu(c1, c1)))
        )
        self.layer2 = nn.Sequential(*conv_bn_relu(c1, c2), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(
            *conv_bn_relu(c2, c3), nn.MaxPool2d(2), Residual(nn.Sequential(conv_bn_relu(c3, c3), conv_bn_relu(c3, c3)))
        )
        self.head = nn.Sequential(
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(c3, num_classes, bias=False), Mul(scale)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer3(self.layer2(self.layer1(self.prep(x)))))


@register("resnet18")
class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem (no max-pool), four stages of two basic blocks, strides 1/2/2/2, avg-pool head."""

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        _check_positive("resnet18", num_classes=num_classes, width=width, in_channels=in_channels)
        self.stem = conv_bn_relu(in_channels, width)
        stages: list[nn.Module] = []
        channels = width
        for multiplier, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
            out_channels = width * multiplier
            stages.append(
                nn.Sequential(ResidualBlock(channels, out_channels, stride), ResidualBlock(out_channels, out_channels))
            )
            channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))
