"""kdcli: knowledge distillation for dense prediction on plain torchvision/timm models."""

__version__ = "0.1.0"
