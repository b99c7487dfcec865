"""fasttrain: a distributed, high-throughput CIFAR-10 trainer."""

__version__ = "0.1.0"
