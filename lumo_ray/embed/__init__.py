"""CLIP embeddings of a manifest's images and captions (library, no Ray): the Parquet parts a `lumo data
embed` run writes and readers load (parts.py), with the model of codecs/clip.py; dedup, the in-process
k-means engine (codecs/kmeans.py's pass over parts) and the tiny CLIP preset's training."""
