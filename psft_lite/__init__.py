"""psft-lite: LoRA/QLoRA fine-tuning with trust-region objectives (Proximal SFT, IDFT, DFT) on one GPU."""

__version__ = "0.1.0"
