"""lumo_ray: the LumoOmni discrete-token multimodal program on Ray.

Library code in this package never imports Ray; `pipelines/` and `trainers/` do.
"""
__version__ = "0.1.0"
