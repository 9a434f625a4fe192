"""Interoperability with PEFT (and through it vLLM, LoRAX): export to PEFT LoRA, import LoRA and FourierFT;
export to llama.cpp's LoRA GGUF (llama.cpp, Ollama)."""

from .gguf_lora import export_gguf_lora
from .peft_fourierft import import_fourierft
from .peft_lora import export_lora, import_lora

__all__ = ["export_gguf_lora", "export_lora", "import_fourierft", "import_lora"]
