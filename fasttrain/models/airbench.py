"""airbench94: Keller Jordan's fast CIFAR-10 net (2x2 patch whitening, three conv groups, GELU, max-pool head).

Parameter names are part of the interface: recipes pick optimiser groups with fnmatch patterns on
`named_parameters()`, so every conv filter is named `*conv*.weight`, every BatchNorm parameter `*norm*`, the
whitening bias `whiten.bias` and the classifier `head.weight`. The frozen weights (whitening filters, BatchNorm
scales) have `requires_grad=False` and are never handed to an optimiser.
"""

import torch
from torch import nn

from fasttrain.errors import ConfigError, DatasetError
from fasttrain.models.registry import register

WHITEN_KERNEL = 2
# Each eigenvector of the 3x2x2 patch covariance gives two filters, W and -W, so both signs survive the GELU.
WHITEN_CHANNELS = 2 * 3 * WHITEN_KERNEL**2


def _frozen_scale_batchnorm(channels: int, batch_weight: float, eps: float) -> nn.BatchNorm2d:
    """BatchNorm with gamma fixed at 1 (only the shift learns).

    `batch_weight` is airbench's BatchNorm momentum, the weight the running statistics keep: they update as
    running = batch_weight * running + (1 - batch_weight) * batch, i.e. torch momentum = 1 - batch_weight.
    """
    norm = nn.BatchNorm2d(channels, eps=eps, momentum=1.0 - batch_weight)
    norm.weight.requires_grad_(False)
    return norm


def _identity_init_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """3x3 'same' conv without bias; its first `in_channels` filters start as the identity (dirac), the rest keep
    PyTorch's default init, so at init the group passes its input through alongside new random features."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding="same", bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:in_channels])
    return conv


class ConvGroup(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU."""

    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float, bn_eps: float) -> None:
        super().__init__()
        self.conv1 = _identity_init_conv(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _frozen_scale_batchnorm(out_channels, bn_momentum, bn_eps)
        self.conv2 = _identity_init_conv(out_channels, out_channels)
        self.norm2 = _frozen_scale_batchnorm(out_channels, bn_momentum, bn_eps)
        self.activation = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.norm1(self.pool(self.conv1(x))))
        return self.activation(self.norm2(self.conv2(x)))


def _check_arguments(
    widths: tuple[int, ...], num_classes: int, bn_momentum: float, bn_eps: float, whiten_eps: float
) -> None:
    if len(widths) != 3 or any(width <= 0 for width in widths):
        raise ConfigError(f"airbench94: widths must be three positive channel counts, e.g. 64,256,256; got {widths}")
    if num_classes <= 0:
        raise ConfigError(f"airbench94: num_classes must be positive, got {num_classes}")
    if not 0.0 <= bn_momentum < 1.0:
        raise ConfigError(
            f"airbench94: bn_momentum (weight of the running statistics) must be in [0, 1), got {bn_momentum}"
        )
    for arg, value in (("bn_eps", bn_eps), ("whiten_eps", whiten_eps)):
        if value <= 0:
            raise ConfigError(f"airbench94: {arg} must be positive, got {value}")


def whitening_filters(images: torch.Tensor, eps: float) -> torch.Tensor:
    """[24, 3, 2, 2] filters that whiten the 2x2 patches of `images` (float, NCHW): for each eigenpair (v, l) of
    the patches' (uncentred) covariance, v / sqrt(l + eps), then the same filters negated.

    Computed in float64 so the eigenbasis is accurate for the near-degenerate small eigenvalues; eigh is
    deterministic, so every rank that passes the same images gets bit-identical filters. The 12x12 eigenproblem is
    solved on the host: on a GPU the first linalg call of a process loads CUDA's solver libraries, which would
    then count in the first run's time.
    """
    if images.ndim != 4 or images.shape[1] != 3 or len(images) == 0:
        raise DatasetError(
            f"whitening needs a non-empty float batch of RGB images [N,3,H,W], got {tuple(images.shape)}"
        )
    # Every 2x2 patch as a row ordered (channel, row, column), the layout of a conv filter: [N*(H-1)*(W-1), 12].
    windows = images.double().unfold(2, WHITEN_KERNEL, 1).unfold(3, WHITEN_KERNEL, 1)  # [N, C, H', W', 2, 2]
    patches = windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * WHITEN_KERNEL**2)
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = (t.to(images.device) for t in torch.linalg.eigh(covariance.cpu()))
    filters = eigenvectors.T / torch.sqrt(eigenvalues + eps).unsqueeze(1)
    filters = filters.reshape(-1, 3, WHITEN_KERNEL, WHITEN_KERNEL)
    return torch.cat([filters, -filters]).float()


@register("airbench94")
class Airbench94(nn.Module):
    """whiten (2x2 conv, 24 frozen filters, trainable bias) -> GELU -> 3 conv groups -> global max-pool ->
    bias-free linear head whose logits are divided by the last width.

    Call `data_init(images)` once before training to set the whitening filters from the training data; until then
    they hold PyTorch's default random init.
    """

    def __init__(
        self,
        widths: tuple[int, int, int] = (64, 256, 256),
        num_classes: int = 10,
        bn_momentum: float = 0.6,
        bn_eps: float = 1e-12,
        whiten_eps: float = 5e-4,
    ) -> None:
        super().__init__()
        widths = tuple(widths)
        _check_arguments(widths, num_classes, bn_momentum, bn_eps, whiten_eps)
        self.whiten_eps = whiten_eps
        self.whiten = nn.Conv2d(3, WHITEN_CHANNELS, kernel_size=WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.activation = nn.GELU()
        channels = (WHITEN_CHANNELS, *widths)
        self.groups = nn.Sequential(
            *(ConvGroup(c_in, c_out, bn_momentum, bn_eps) for c_in, c_out in zip(channels[:-1], channels[1:]))
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        # Dividing the logits by the width (in forward) keeps their scale independent of it; a unit-std head weight
        # then starts them at a moderate size.
        with torch.no_grad():
            self.head.weight.div_(self.head.weight.std())
        self.logit_divisor = float(widths[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.activation(self.whiten(x)))
        return self.head(self.pool(x).flatten(1)) / self.logit_divisor

    @torch.no_grad()
    def data_init(self, images: torch.Tensor) -> None:
        """Set the whitening filters from `images`: float32, normalised, unaugmented NCHW training images."""
        self.whiten.weight.copy_(whitening_filters(images, self.whiten_eps))
