"""The AF3 network in Flax NNX: leaf layers, AF-Whisper encoder, projector, Qwen2 decoder, the whole."""
