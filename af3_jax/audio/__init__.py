"""Audio input: files to 16 kHz mono float (`loading`), then Whisper log-mel windows (`features`)."""

from af3_jax.audio.features import (FRAMES, HOP, MAX_WINDOWS, N_FFT, N_MELS, SAMPLE_RATE, WINDOW_SAMPLES,
                                    extract_features, log_mel, split_windows)
from af3_jax.audio.loading import load_audio

__all__ = ["FRAMES", "HOP", "MAX_WINDOWS", "N_FFT", "N_MELS", "SAMPLE_RATE", "WINDOW_SAMPLES",
           "extract_features", "load_audio", "log_mel", "split_windows"]
