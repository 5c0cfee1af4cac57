"""qos-compile: QoS-Nets approximate neural networks, from PyTorch to edge binaries."""

__version__ = "0.1.0"
