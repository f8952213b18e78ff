"""Text, audio and image adapters behind one interface (see base.py)."""
