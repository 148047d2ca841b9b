"""`recurchat export hf`: the folder loads with transformers (trust_remote_code) and computes what recurchat does —
logits at any r, generate() with full and last caches and under an exit, greedy text equal to `recurchat sample` —
with a model card measured at export and --push through huggingface_hub. Run: `pytest tests/test_export_hf.py`.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from support import perturbed, smoke_run
from transformers import AutoModelForCausalLM, AutoTokenizer

from recurchat import checkpoint
from recurchat.cli import main
from recurchat.config import TrainConfig
from recurchat.infer.engine import Engine, RecurParams
from recurchat.infer.sampling import SamplingParams

PROMPT = "In the beginning God created"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_text):
    """A smoke checkpoint whose output projections are perturbed (so r changes the logits), and its export."""
    root = tmp_path_factory.mktemp("export")
    loaded, model = checkpoint.load_model(smoke_run(root, small_text, steps=2), "cpu")
    model = perturbed(model, seed=0)
    ckpt = checkpoint.save(root / "perturbed", model, loaded.model_cfg, TrainConfig(), loaded.tokenizer)
    out = root / "hf"
    assert main(["export", "hf", "--ckpt", str(ckpt), "--out", str(out), "--card-eval-tokens", "256"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    return SimpleNamespace(ckpt=ckpt, out=out, model=model.eval(), cfg=loaded.model_cfg, hf=hf, tok=tok,
                           ids=tok(PROMPT, return_tensors="pt").input_ids, recurchat_tok=loaded.tokenizer)


def test_the_tokenizer_puts_bos_first_as_recurchat_does(exported):
    t = exported.recurchat_tok
    assert exported.ids[0].tolist() == [t.bos_id] + t.encode(PROMPT)
    assert exported.tok.decode(exported.ids[0], skip_special_tokens=True) == PROMPT


def test_logits_equal_recurchat_forward_at_every_depth(exported):
    rbar = exported.cfg.mean_recur
    seen = []
    with torch.no_grad():
        for r in (1, rbar, 2 * rbar):
            ours, theirs = exported.model(exported.ids, num_recur=r), exported.hf(exported.ids, num_recur=r).logits
            torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
            seen.append(ours)
    assert not torch.allclose(seen[0], seen[1], atol=1e-3)  # the depth does change the prediction


@pytest.mark.parametrize("kwargs", [{"num_recur": 2}, {"num_recur": 4, "kv": "last"}, {"num_recur": 3, "kv": "full"},
                                    {"exit": "kl:0.01", "max_recur": 6}, {"exit": "latent:0.2", "max_recur": 5,
                                                                          "kv": "last"}])
def test_generate_with_the_recursion_cache_equals_recurchat_decoding(exported, kwargs):
    ids = torch.cat([exported.ids, exported.ids])  # a batch of two equal prompts
    out = exported.hf.generate(ids, max_new_tokens=16, do_sample=False, **kwargs)
    recur = RecurParams(num_recur=kwargs.get("num_recur"), exit=kwargs.get("exit"), max_recur=kwargs.get("max_recur"),
                        kv=kwargs.get("kv", "full"))
    greedy = SamplingParams(max_tokens=16, temperature=0.0, stop_ids=(exported.recurchat_tok.bos_id,))
    ref = Engine(exported.model, dtype="fp32").generate([exported.ids[0].tolist()], greedy, recur)[0].tokens
    for row in out:
        new = row[exported.ids.size(1):].tolist()
        assert new[:len(ref)] == ref and (len(new) == len(ref) or new[len(ref)] == exported.recurchat_tok.bos_id)


def test_round_trip_greedy_text_equals_recurchat_sample(exported, capsys):
    assert main(["sample", "--ckpt", str(exported.ckpt), "-p", PROMPT, "--temperature", "0", "--max-tokens", "20",
                 "--dtype", "fp32"]) == 0
    sampled = capsys.readouterr().out.rstrip("\n")
    out = exported.hf.generate(exported.ids, max_new_tokens=20, do_sample=False)
    assert PROMPT + exported.tok.decode(out[0, exported.ids.size(1):], skip_special_tokens=True) == sampled


def test_padded_batches_and_exit_without_generate_are_refused(exported):
    mask = torch.ones(2, exported.ids.size(1), dtype=torch.long)
    mask[1, 0] = 0
    with pytest.raises(ValueError, match="unpadded"):
        exported.hf(torch.cat([exported.ids, exported.ids]), attention_mask=mask)
    with pytest.raises(ValueError, match="use generate"):
        exported.hf(exported.ids, exit="kl:0.01")


def test_the_folder_and_its_model_card(exported):
    files = sorted(p.name for p in exported.out.iterdir())
    assert files == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                     "modeling_recurchat.py", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((exported.out / "config.json").read_text())
    assert config["mean_recur"] == exported.cfg.mean_recur and config["r_max"] == exported.cfg.r_max
    assert "import recurchat" not in (exported.out / "modeling_recurchat.py").read_text()
    card = (exported.out / "README.md").read_text()
    assert f"{exported.model.num_params()['total']:,} parameters" in card
    rows = [line for line in card.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r.split("|")[1]) for r in rows] == [1, exported.cfg.mean_recur, 2 * exported.cfg.mean_recur]
    assert all(float(r.split("|")[3]) > 0 for r in rows)  # bpb measured at export
    assert "exit=" in card and "num_recur=" in card


def test_push_uploads_the_folder_and_a_foreign_out_is_refused(exported, tmp_path, monkeypatch, capsys):
    hub = tmp_path / "hub"

    class LocalHub:
        """huggingface_hub.HfApi's two calls, into a local folder: the hub itself cannot be reached from tests."""

        def create_repo(self, repo_id, exist_ok=False):
            (hub / repo_id).mkdir(parents=True, exist_ok=exist_ok)

        def upload_folder(self, folder_path, repo_id, commit_message):
            shutil.copytree(folder_path, hub / repo_id, dirs_exist_ok=True)

    monkeypatch.setattr("huggingface_hub.HfApi", LocalHub)
    out = tmp_path / "again"
    assert main(["export", "hf", "--ckpt", str(exported.ckpt), "--out", str(out), "--card-eval-tokens", "0",
                 "--push", "me/tiny"]) == 0
    assert sorted(p.name for p in (hub / "me" / "tiny").iterdir()) == sorted(p.name for p in out.iterdir())
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["export", "hf", "--ckpt", str(exported.ckpt), "--out", str(foreign)]) == 2
    assert "not an exported recurchat folder" in capsys.readouterr().err and (foreign / "notes.txt").exists()
