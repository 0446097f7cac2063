"""The OpenAI-compatible server behind `serve.py`: the protocol's request bodies and errors (`protocol`),
audio parts into waveforms (`media`), chat requests into engine requests (`chat`), answer text with stop
strings (`text`), the started engine and what the routes need besides (`service`), compiling ahead
(`warmup`), one request answered whole or streamed (`replies`), the body cap (`body_limit`), and the
FastAPI app over one engine (`app`)."""
