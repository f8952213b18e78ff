"""CLIP embeddings of a manifest's images and captions (library, no Ray): the model (clip.py) and the
Parquet parts a `lumo data embed` run writes and readers load (parts.py)."""
