"""The OpenAI-compatible server behind `serve.py`: the protocol's request bodies and errors (`protocol`),
audio parts into waveforms (`media`), chat requests into engine requests (`chat`), answer text with stop
strings (`text`), and the FastAPI app over one engine (`app`)."""
