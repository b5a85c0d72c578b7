"""Stage entry points: rule `<stage>` (or `<stage>_<phase>`) runs `python -m emotion_neurons.stages.<stage>`.

Each module here parses `--params` and file arguments, calls the library (the package one level up) and writes
its outputs atomically. The stage -> module map is this naming rule (see `config.stage_module`), not a table.
"""
