"""`python -m lumo_ray.cli ...` (what `ray job submit -- python -m lumo_ray.cli` runs)."""
import sys

from .main import main

sys.exit(main())
