"""`lumo demo`: run.py runs the stages and writes the report; vlm.py, lm.py and mmpt.py hold the
bodies of the VLM, token-LM and stage-4 stages with their measured settings."""
