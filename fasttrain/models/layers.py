"""Building blocks shared by the models. No data-dependent control flow, so torch.compile sees one graph."""

import torch
from torch import nn


def conv_bn(
    in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, batchnorm: bool = True
) -> nn.Sequential:
    """Same-padded conv followed by BatchNorm (the conv then has no bias: the BN shift replaces it).

    Without BatchNorm the conv gets a bias and an Identity stands where the BN was, so module positions match.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=not batchnorm),
        nn.BatchNorm2d(out_channels) if batchnorm else nn.Identity(),
    )


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, batchnorm: bool = True
) -> nn.Sequential:
    """conv_bn followed by ReLU."""
    return nn.Sequential(*conv_bn(in_channels, out_channels, kernel, stride, batchnorm), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """Basic block: ReLU(branch(x) + shortcut(x)), branch = conv3x3-BN-ReLU-dropout-conv3x3-BN.

    The shortcut is the identity, or a strided 1x1 conv-BN projection when channels or stride change.
    `branch[-1]` is the last BatchNorm: zeroing its weight and bias zeroes the residual branch.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0, batchnorm: bool = True
    ) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            *conv_bn_relu(in_channels, out_channels, stride=stride, batchnorm=batchnorm),
            nn.Dropout(dropout),
            *conv_bn(out_channels, out_channels, batchnorm=batchnorm),
        )
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut: nn.Module = (
            conv_bn(in_channels, out_channels, kernel=1, stride=stride, batchnorm=batchnorm)
            if needs_projection
            else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.branch(x) + self.shortcut(x))


class PlainBlock(nn.Module):
    """ReLU(branch(x)), the branch exactly ResidualBlock's: the same two convs with nothing added back.

    The connection-free baseline: no identity path and no projection shortcut, so a stage of plain blocks differs
    from a residual stage only in the connection (and has fewer parameters by the projections it lacks).
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0, batchnorm: bool = True
    ) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            *conv_bn_relu(in_channels, out_channels, stride=stride, batchnorm=batchnorm),
            nn.Dropout(dropout),
            *conv_bn(out_channels, out_channels, batchnorm=batchnorm),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.branch(x))


class SkipConnectionBlock(nn.Module):
    """cat([x, body(x)], dim=1), body = conv3x3-(BN)-ReLU-dropout-conv3x3-(BN)-ReLU: in + out channels come out.

    Dropout sits where the residual and plain blocks have it, between the two convs.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, batchnorm: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn_relu(in_channels, out_channels, batchnorm=batchnorm),
            nn.Dropout(dropout),
            *conv_bn_relu(out_channels, out_channels, batchnorm=batchnorm),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


class Residual(nn.Module):
    """x + module(x), for a module that keeps the shape (the ResNet-9 residuals, which have no final ReLU)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.module(x)


class Mul(nn.Module):
    """Multiply by a constant: the ResNet-9 logit scale, which acts like a softmax temperature."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
