"""A small token space (text 100, image 16 codes, audio 2 x 8) for sequence and CFG tests without codecs."""
from lumo_ray.config import DEFAULT_SPECIALS
from lumo_ray.token_space import TokenSpace

ADAPTERS = {"text": {"kind": "hf_tokenizer", "name": "t", "vocab_size": 100},
            "image": {"kind": "vq", "codebook_size": 16}, "audio": {"kind": "encodec", "num_codebooks": 2, "codebook_size": 8}}


def small_token_space(text_vocab: int = 100) -> TokenSpace:
    return TokenSpace.from_sizes(text_vocab=text_vocab, specials=list(DEFAULT_SPECIALS), special_slots=16,
                                 image_codebook=16, audio_codebooks=2, audio_codebook_size=8, adapters=ADAPTERS,
                                 pad_multiple=64)
