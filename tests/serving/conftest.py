"""The server the serving tests share: serve.py's app on a real uvicorn over the tiny checkpoint, started
once for all of them (warming it up is most of their time)."""

import pytest
from programs import serving


@pytest.fixture(scope="package")
def server(model_dir, media):
  with serving(model_dir, media) as running:
    yield running
