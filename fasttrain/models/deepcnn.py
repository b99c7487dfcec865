"""The tutorial-style deep CNN: a stem, one stage of plain, residual or skip blocks per width, a pooled head."""

from typing import Literal

import torch
from torch import nn

from fasttrain.errors import ConfigError
from fasttrain.models.layers import PlainBlock, ResidualBlock, SkipConnectionBlock, conv_bn_relu
from fasttrain.models.registry import register

# plain: two convs, nothing added back; residual: the input added back; skip: the input concatenated.
BLOCKS = ("plain", "residual", "skip")


def _check_arguments(
    widths: tuple[int, ...],
    blocks: tuple[int, ...],
    block: str,
    dropout: float,
    stem_channels: int | None,
    num_classes: int,
    in_channels: int,
) -> None:
    if len(widths) == 0:
        raise ConfigError("deepcnn: widths must name at least one stage width")
    if len(widths) != len(blocks):
        raise ConfigError(f"deepcnn: widths {widths} and blocks {blocks} must have the same length (one per stage)")
    for arg, values in (("widths", widths), ("blocks", blocks)):
        if any(v <= 0 for v in values):
            raise ConfigError(f"deepcnn: every entry of {arg} must be positive, got {values}")
    if block not in BLOCKS:
        raise ConfigError(f"deepcnn: block must be one of {', '.join(BLOCKS)}, got {block!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"deepcnn: dropout must be in [0, 1), got {dropout}")
    for arg, value in (("stem_channels", stem_channels), ("num_classes", num_classes), ("in_channels", in_channels)):
        if value is not None and value <= 0:
            raise ConfigError(f"deepcnn: {arg} must be positive, got {value}")


def _two_conv_stage(
    block_class: type[PlainBlock | ResidualBlock],
    in_channels: int,
    width: int,
    count: int,
    dropout: float,
    batchnorm: bool,
) -> nn.Sequential:
    return nn.Sequential(
        *(
            block_class(in_channels if i == 0 else width, width, dropout=dropout, batchnorm=batchnorm)
            for i in range(count)
        )
    )


def _skip_stage(in_channels: int, width: int, count: int, dropout: float, batchnorm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    for _ in range(count):
        layers.append(SkipConnectionBlock(channels, width, dropout=dropout, batchnorm=batchnorm))
        channels += width
    # Each skip block concatenates `width` new channels; a 1x1 transition brings the stage back to `width`.
    layers.append(conv_bn_relu(channels, width, kernel=1, batchnorm=batchnorm))
    return nn.Sequential(*layers)


@register("deepcnn")
class DeepCNN(nn.Module):
    """stem (conv3x3-BN-ReLU-maxpool2) -> stages (maxpool2 between them) -> global avg pool -> dropout -> linear.

    `block`: "plain" (two convs), "residual" (the same two convs plus the input) or "skip" (the input concatenated
    to two conv-BN-ReLUs, a 1x1 transition ending each stage). `dropout` sits between the two convs of every block
    and before the head.

    `batchnorm=False` drops every BatchNorm (convs get biases): a model whose output does not depend on how a batch
    is split across processes, which the DDP-equivalence test needs.
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (32, 64, 128),
        blocks: tuple[int, ...] = (2, 2, 2),
        block: Literal["plain", "residual", "skip"] = "residual",
        dropout: float = 0.0,
        stem_channels: int | None = None,
        num_classes: int = 10,
        in_channels: int = 3,
        batchnorm: bool = True,
    ) -> None:
        super().__init__()
        widths, blocks = tuple(widths), tuple(blocks)
        _check_arguments(widths, blocks, block, dropout, stem_channels, num_classes, in_channels)
        stem_channels = widths[0] if stem_channels is None else stem_channels

        self.stem = nn.Sequential(*conv_bn_relu(in_channels, stem_channels, batchnorm=batchnorm), nn.MaxPool2d(2))
        stages: list[nn.Module] = []
        channels = stem_channels
        for i, (width, count) in enumerate(zip(widths, blocks)):
            if i > 0:
                stages.append(nn.MaxPool2d(2))
            if block in ("plain", "residual"):
                block_class = PlainBlock if block == "plain" else ResidualBlock
                stages.append(_two_conv_stage(block_class, channels, width, count, dropout, batchnorm))
            else:
                stages.append(_skip_stage(channels, width, count, dropout, batchnorm))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))
