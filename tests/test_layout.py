"""Names that match from rule to module to log: the stage -> entry-module map is a naming rule, not a table."""

from __future__ import annotations

import re
from pathlib import Path

from emotion_neurons.config import PACKAGE_DIR, stage_files, stage_module, stages

REPO = Path(__file__).resolve().parents[1]
RULE = re.compile(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", re.S | re.M)


def _rules() -> dict[str, str]:
    out = {}
    for p in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        code = "\n".join(line for line in p.read_text().splitlines() if not line.lstrip().startswith("#"))
        out.update({m.group(1): m.group(2) for m in RULE.finditer(code)})
    return out


def test_every_rule_runs_the_stage_module_it_is_named_for():
    rules = _rules()
    seen = set()
    for name, body in rules.items():
        mods = re.findall(r"python -m emotion_neurons\.([\w.]+)", body)
        assert len(mods) == 1, f"rule {name} runs {mods}"
        stage = mods[0].removeprefix("stages.")
        assert mods[0] == stage_module(stage), f"rule {name} runs {mods[0]}, not a module under stages/"
        assert (PACKAGE_DIR / "stages" / f"{stage}.py").is_file(), f"rule {name}: no stages/{stage}.py"
        log = re.search(r"log:\s*\n\s*f?\"[^\"]*/logs/([\w-]+)", body).group(1)
        assert log.startswith(stage), f"rule {name} (stage {stage}) logs to {log}"
        assert name == stage or name.startswith(f"{stage}_") or log.startswith(f"{stage}-"), name
        seen.add(stage)
    assert seen == set(stages()), "every module under stages/ is run by a rule and every rule's module is there"


def test_stage_files_start_from_the_derived_entry_module():
    for stage in stages():
        assert PACKAGE_DIR / "stages" / f"{stage}.py" in stage_files(stage)


def test_snakefile_imports_stay_torch_free():
    """The modules the Snakefile imports at parse time, with validation and the rerun hashes of every stage,
    load neither torch nor transformers: adapter declarations are read from source."""
    import subprocess
    import sys

    code = "\n".join([
        "import sys, yaml",
        "import emotion_neurons.schema, emotion_neurons.models, emotion_neurons.selectors, emotion_neurons.stages.judge",
        "from emotion_neurons.config import code_version, stages",
        "from emotion_neurons.schema import validate_config",
        f"cfg = yaml.safe_load(open({str(REPO / 'config.yaml')!r}))",
        "validate_config(cfg)",
        "[code_version(s, cfg['model']['adapter']) for s in stages()]",
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))",
    ])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]", res.stdout
