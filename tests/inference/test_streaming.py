"""`Assistant.reply` streaming without a model: a stand-in `decode.generate_stream` yields fixed tokens, and
the tiny byte-level tokenizer splits every non-ASCII character into several tokens."""

from types import SimpleNamespace

import numpy as np
import pytest
from tokenizers.decoders import DecodeStream

from af3_jax.data.processor import Processor
from af3_jax.inference import assistant, decode


ANSWER = " héllo 世界 🎵 ok\n"  # the spaces and newline check that only the returned answer is stripped
QUESTION = [{"role": "user", "content": "Describe the sound."}]


class Pieces:
  """An `out` that keeps each write separately."""

  def __init__(self):
    self.pieces = []

  def write(self, text):
    self.pieces.append(text)

  def flush(self):
    pass


@pytest.fixture(scope="module")
def processor(tokenizer_dir):
  return Processor.from_pretrained(tokenizer_dir)


def answerer(processor, monkeypatch, tokens):
  """An Assistant whose generation yields `tokens` one step at a time."""
  monkeypatch.setattr(decode, "generate_stream", lambda *args, **kwargs: (np.array([t]) for t in tokens))
  model = SimpleNamespace(config=SimpleNamespace(decoder=SimpleNamespace(max_position_embeddings=4096)))
  return assistant.Assistant(model, processor, max_new_tokens=len(tokens))


def answer_tokens(processor, repeats=1):
  """ANSWER `repeats` times, then `<|im_end|>` as the model ends its turn."""
  tok = processor.tokenizer
  return [*tok.encode(ANSWER * repeats, add_special_tokens=False), tok.convert_tokens_to_ids("<|im_end|>")]


def test_streamed_pieces_add_up_to_the_decode(processor, monkeypatch):
  tok = processor.tokenizer
  assert all(len(tok.encode(c, add_special_tokens=False)) > 1 for c in "é世界🎵")  # byte-level: split
  tokens = answer_tokens(processor)
  whole = tok.decode(tokens, skip_special_tokens=True)
  assert whole == ANSWER
  out = Pieces()
  answer = answerer(processor, monkeypatch, tokens).reply(QUESTION, out)
  assert answer == whole.strip()
  assert "".join(out.pieces) == whole
  assert all(piece and "\ufffd" not in piece for piece in out.pieces)
  assert answerer(processor, monkeypatch, tokens).reply(QUESTION) == answer  # with no `out`


def test_each_token_is_decoded_a_bounded_number_of_times(processor, monkeypatch):
  """Counts token ids handed to the tokenizer's `decode` and to `DecodeStream.step`: linear in the answer
  length. Re-decoding the whole answer at every step hands over n (n + 1) / 2."""
  handed = []
  decode_all = processor.tokenizer.decode

  def counted_decode(ids, **kwargs):
    handed.append(len(ids))
    return decode_all(ids, **kwargs)


  class CountedStream:
    def __init__(self, **kwargs):
      self.stream = DecodeStream(**kwargs)

    def step(self, tokenizer, token):
      handed.append(1)
      return self.stream.step(tokenizer, token)

  monkeypatch.setattr(processor.tokenizer, "decode", counted_decode)
  monkeypatch.setattr(assistant, "DecodeStream", CountedStream)
  tokens = answer_tokens(processor, repeats=4)
  answerer(processor, monkeypatch, tokens).reply(QUESTION, Pieces())
  assert 0 < sum(handed) <= 2 * len(tokens)
