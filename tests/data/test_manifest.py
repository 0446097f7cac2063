"""The upstream JSON manifest: conversation structure and clear errors for malformed items."""

import json

import pytest

from af3_jax.data.manifest import read_manifest


def write(tmp_path, items):
  path = tmp_path / "train.json"
  path.write_text(json.dumps(items))
  return path


def test_single_audio_keeps_first_exchange_and_drops_literals(tmp_path):
  path = write(tmp_path, [{"id": "a", "sound": "clips/a.wav", "conversations": [
      {"from": "human", "value": "<sound>\nWhat is it?"}, {"from": "gpt", "value": "A dog."},
      {"from": "human", "value": "More?"}, {"from": "gpt", "value": "No."}]}])
  (sample,) = read_manifest(path)
  assert sample.id == "a"
  assert sample.conversation == [
      {"role": "user", "content": [{"type": "audio", "path": str(tmp_path / "clips/a.wav")},
                                   {"type": "text", "text": "What is it?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]}]


def test_multi_audio_keeps_every_turn_and_tags(tmp_path):
  path = write(tmp_path, [{"id": 7, "sound": ["/abs/x.wav", "y.flac"], "conversations": [
      {"from": "human", "value": "<sound-1> and <sound-2>?"}, {"from": "gpt", "value": "Two."},
      {"from": "human", "value": "Again <sound-2>"}, {"from": "gpt", "value": "Yes."}]}])
  (sample,) = read_manifest(path)
  assert sample.id == "7" and len(sample.conversation) == 4
  assert sample.conversation[0]["content"][:2] == [{"type": "audio", "path": "/abs/x.wav"},
                                                   {"type": "audio", "path": str(tmp_path / "y.flac")}]
  assert sample.conversation[2]["content"] == [{"type": "text", "text": "Again <sound-2>"}]


def test_text_only(tmp_path):
  path = write(tmp_path, [{"id": "t", "conversations": [{"from": "human", "value": "<sound> hi"},
                                                        {"from": "gpt", "value": "hello"}]}])
  (sample,) = read_manifest(path)
  assert sample.conversation[0]["content"] == [{"type": "text", "text": "<sound> hi"}]


@pytest.mark.parametrize("items, message", [
    ({"id": "x"}, "a JSON list"),
    ([{"sound": "a.wav", "conversations": []}], "item 0: has no id"),
    ([{"id": "ok", "conversations": [{"from": "human", "value": "q"}]}, {"id": "b", "conversations": []}],
     "item 1 \\(id 'b'\\): needs a non-empty"),
    ([{"id": "c", "conversations": [{"from": "bot", "value": "q"}]}], "item 0 \\(id 'c'\\): each turn"),
    ([{"id": "d", "sound": ["a.wav"], "conversations": [{"from": "human", "value": "<sound-3>"}]}],
     "<sound-3> but 'sound' lists 1 file"),
    ([{"id": "e", "sound": 3, "conversations": [{"from": "human", "value": "q"}]}], "'sound' must be a path"),
])
def test_malformed_items_are_named(tmp_path, items, message):
  with pytest.raises(ValueError, match=f"train.json: .*{message}"):
    read_manifest(write(tmp_path, items))


def test_unreadable_manifest(tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="bad.json: not a readable JSON manifest"):
    read_manifest(bad)
  with pytest.raises(ValueError, match="missing.json: not a readable JSON manifest"):
    read_manifest(tmp_path / "missing.json")
