"""Style Template Studio: style LoRAs with the Style-friendly SNR sampler."""

__version__ = "0.1.0"
