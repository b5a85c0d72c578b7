"""Build the embedded tiny setup: `python -m emotion_neurons.tiny --out .tiny`.

Creates tiny random models of the real classes, links the packaged faster-whisper tiny.en, and synthesises a
small ESD-layout corpus. Everything is deterministic and offline; existing parts are kept (use --force).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger("emotion_neurons.tiny")

SPEAKERS = ["0011", "0012", "0013", "0016", "0017"]


def build_all(out: Path, force: bool = False, n_sentences: int = 4) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}

    def step(name: str, fn) -> None:
        target = out / name
        if target.exists() and not force:
            log.info("%s exists, kept", target)
        else:
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.exists():
                shutil.rmtree(target)
            t0 = time.perf_counter()
            fn(target)
            log.info("built %s in %.1f s", target, time.perf_counter() - t0)
        made[name] = target

    from . import audio_flamingo3, corpus, emotion2vec, qwen_omni

    step("qwen2_5_omni", qwen_omni.build)
    step("audio_flamingo3", audio_flamingo3.build)
    step("emotion2vec", emotion2vec.build)
    step("esd", lambda p: corpus.build(p, speakers=SPEAKERS, n_sentences=n_sentences))

    def link_whisper(p: Path) -> None:
        from ..judges import whisper_tiny_path

        p.symlink_to(Path(whisper_tiny_path()).resolve(), target_is_directory=True)

    step("whisper-tiny.en", link_whisper)
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=".tiny")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--n-sentences", type=int, default=4)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    build_all(Path(a.out), a.force, a.n_sentences)
    return 0


if __name__ == "__main__":
    sys.exit(main())
