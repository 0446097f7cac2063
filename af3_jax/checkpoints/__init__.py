"""Checkpoints: finding upstream layouts (`locate`), their key names (`names`), reading and writing
safetensors (`safetensors`) and our orbax copies (`orbax`), a model loaded from any of them
(`pretrained`), int8 weights (`quantization`), LoRA adapters (`lora`) and the tests' tiny checkpoints
(`tiny`)."""
