"""Loading a base model (hub, local folder, GGUF, the embedded default), attaching LoRA, and the chunked LM head."""
