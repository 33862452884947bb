"""The rules every layer obeys: the config schema and its checks, the HF ``config.json`` reader, conventions.

``schema`` (the dataclasses, YAML and overrides), ``checks`` (validation, one checker per
section), ``hf_model`` (reading and checking a Qwen2 ``config.json``), ``conventions`` (CP
alignment, dtype names, the optimizer settings). Standard library and PyYAML only, and no
other project import, so ``plan`` runs on a laptop and launchers read a config before anything
heavy starts.
"""
