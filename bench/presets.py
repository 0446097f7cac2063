"""Model sizes shared by the benchmarks (random weights, so no download)."""

from af3_jax.config import AF3Config, DecoderConfig, EncoderConfig

MODELS = {
    # The tests' tiny model (tests/conftest.py TINY[0], "gqa"): 4 query heads share 2 kv heads.
    "test": AF3Config(
        encoder=EncoderConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
        decoder=DecoderConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                              head_dim=16, intermediate_size=128, rope_theta=5000.0),
        audio_token_id=299),
    # Wider than the test configs so the matmuls, not the dispatch, take the time on a CPU.
    "tiny": AF3Config(
        encoder=EncoderConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512),
        decoder=DecoderConfig(vocab_size=4096, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=1,
                              head_dim=64, intermediate_size=1024),
        audio_token_id=4095),
    "full": AF3Config(),  # the released AF3: 8,267,215,360 parameters
}
