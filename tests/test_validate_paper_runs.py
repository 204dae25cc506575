"""The paper's case studies end to end: the packaged models against the paper's qualitative
results, reduced trainings that reproduce them, resumable training, and `semlens validate
--case-study`."""
from __future__ import annotations

import json

import pytest
import torch

from semlens_fast.cli import main
from semlens_fast.validate.paper import modular_addition as ma
from semlens_fast.validate.paper import two_sat as ts

E = ma.COMPONENTS  # modular addition: embedding, angle sums, logits
S = ts.COMPONENTS  # 2-SAT: parsing, evaluating neurons, output OR


@pytest.fixture(scope="module")
def modadd_report():
    return ma.run_modular_addition()


def test_modular_addition_packaged_model_reproduces_the_paper(modadd_report):
    rep = modadd_report
    assert rep.details and len(rep.rows) == 18
    by = {(r.component, r.axiom, r.equivalence): r for r in rep.rows}
    assert all(r.n == ma.PAPER_N for r in rep.rows)  # the paper's test set size: 8,939 pairs
    # with outputs rounded to 3 decimals (and the downstream equivalence at the angle sums), every axiom at
    # every component holds on every test pair: epsilon = 1 - 0.05^(1/8939) = 3.35e-4, as in the paper
    for comp, eqs in [(E[0], ["rounded-3"]), (E[1], ["downstream"]), (E[2], ["exact"])]:
        for ax in ("A1", "A2"):
            for e in eqs:
                assert by[comp, ax, e].failures == 0, (comp, ax, e)
        for ax in ("A3", "A4"):
            assert by[comp, ax, "argmax"].failures == 0, (comp, ax)
    assert by[E[0], "A1", "rounded-3"].epsilon == pytest.approx(3.35e-4, rel=1e-3)
    # without rounding, equivalence fails on every pair (epsilon 1), while replaceability holds
    for comp in (E[0], E[1]):
        for ax in ("A1", "A2"):
            assert by[comp, ax, "exact"].failures == ma.PAPER_N and by[comp, ax, "exact"].epsilon == 1.0
    assert all(r.agrees for r in rep.rows if r.epsilon_paper is not None and r.equivalence != "rounded-1")
    text = str(rep)
    assert "eps paper" in text and "key frequencies" in text


def test_modular_addition_reduced_training_reproduces_the_pattern():
    # P = 23 instead of 113, a smaller model, 60% of the pairs for training: seed 0 groks in 2,100
    # full-batch steps, and the Fourier interpretation shows the paper's pattern. At this size grokking
    # is seed-dependent: of seeds 0-4 only seed 0 is right on every test pair within 4,000 steps
    # (scripts/measure_paper_case_studies.py --p 23 ...; see docs/validate.md), so this pins seed 0
    model, info = ma.train_modular_addition(23, 0.6, seed=0, d_model=64, d_mlp=256, max_steps=4000,
                                            stop_test_loss=1e-3, progress=False)
    assert info["metrics"]["test_acc"] == 1.0 and info["steps"] < 4000
    data = ma.dataset(23, 0.6, 0)
    rep = ma.run_modular_addition(model, data=data, info=info)
    by = {(r.component, r.axiom, r.equivalence): r for r in rep.rows}
    n = len(data.test)
    assert 2 <= len(ma.key_frequencies(model, 23)) <= 6
    for ax in ("A1", "A2"):
        assert by[E[0], ax, "rounded-3"].failures == 0  # rounded: the embedding claim holds
        assert by[E[0], ax, "exact"].failures == n and by[E[1], ax, "exact"].failures == n  # unrounded: never
        assert by[E[1], ax, "downstream"].failures < 0.1 * n  # the downstream equivalence mostly holds
    for comp in E:
        assert by[comp, "A3", "argmax"].failures == 0  # the abstract prefix carries what the model needs


def test_two_sat_pipeline_on_an_untrained_model_builds_the_table_and_warns():
    # no trained 2-SAT model ships yet: check the whole pipeline (fit, five variants in one pass, the table)
    # on a small random model, with the invariants that hold for any model
    torch.manual_seed(0)
    model = ts.make_model(32, (1, 4), 64).eval()
    rep = ts.run_two_sat(model, n_fit=400, n_test=300, batch_size=128)
    assert len(rep.rows) == len(ts.PAPER) and all(r.n == 300 for r in rep.rows)
    assert {(r.component, r.axiom, r.equivalence) for r in rep.rows} == set(ts.PAPER)
    unordered, ordered = rep.row(S[0], "A1", "unordered-clauses"), rep.row(S[0], "A1", "exact")
    assert ordered.failures >= unordered.failures  # requiring the literal order can only fail more
    assert rep.row(S[0], "A2", "unordered-clauses").failures == unordered.failures  # first stage: A2 is A1
    for r in rep.rows:
        assert 0 <= r.failures <= r.n and r.epsilon_paper == ts.PAPER[r.component, r.axiom, r.equivalence]
    assert "d_model 32, MLP 64" in rep.details["model"] and "untrained" in rep.details["warning"]
    assert "warning" in str(rep)


def test_training_resumes_from_its_checkpoint(tmp_path):
    kw = dict(batch_size=16, d_model=16, d_mlp=32, eval_every=2, n_val=64, target_acc=1.1, progress=False)
    ref, _ = ts.train_two_sat(0, max_steps=4, **kw)
    ck = tmp_path / "ck"
    part, info = ts.train_two_sat(0, max_steps=2, checkpoint=ck, **kw)
    assert info["steps"] == 2 and ck.exists()
    done, info = ts.train_two_sat(0, max_steps=4, checkpoint=ck, **kw)  # resumes at step 2
    assert info["steps"] == 4 and len(info["history"]) == 2
    for k, v in ref.state_dict().items():
        assert torch.equal(v, done.state_dict()[k]), k


def test_packaged_weights_record_the_default_recipe():
    # the packaged file is what `scripts/train_paper_case_studies.py modular-addition` makes with the
    # defaults of train_modular_addition (checked bit for bit by retraining; too slow for CI): the
    # recorded recipe must stay those defaults, and the run must have stopped by the default criterion
    import inspect

    _, info = ma.load_model()
    d = {k: v.default for k, v in inspect.signature(ma.train_modular_addition).parameters.items()}
    for k in ("p", "frac_train", "seed", "lr", "weight_decay"):
        assert info[k] == d[k], k
    cfg = info["config"]
    assert (cfg["d_model"], cfg["n_heads"], cfg["d_mlp"]) == (d["d_model"], [d["n_heads"]], d["d_mlp"])
    m = info["metrics"]
    assert info["steps"] == 2100 and info["steps"] % d["eval_every"] == 0 and info["steps"] < d["max_steps"]
    assert m["test_acc"] == 1.0 and m["test_loss"] < d["stop_test_loss"]


def test_saved_weights_round_trip(tmp_path):
    model, info = ma.train_modular_addition(7, 0.6, max_steps=3, d_model=8, d_mlp=16, progress=False)
    ma.save_model(model, tmp_path / "m.safetensors", info)
    back, meta = ma.load_model(tmp_path / "m.safetensors")
    assert meta["steps"] == 3 and meta["p"] == 7
    x = ma.dataset(7, 0.6).x
    with torch.no_grad():
        assert torch.equal(model(x), back(x))
    with pytest.raises(Exception, match="not found"):
        ma.load_model(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------- the command


def test_cli_case_study_modular_addition_json_and_text(capsys):
    assert main(["validate", "--case-study", "modular-addition", "--json", "--no-progress"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 18
    for r in rows:
        assert {"component", "axiom", "equivalence", "n", "failures", "epsilon", "epsilon_paper"} <= set(r)
    assert {r["equivalence"] for r in rows} == {"rounded-3", "exact", "downstream", "rounded-1", "argmax"}
    assert main(["validate", "--case-study", "modular-addition", "--samples", "500", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "eps paper" in out and "where our numbers differ" in out and "500" in out


def test_cli_case_study_bad_arguments(capsys, monkeypatch, tmp_path):
    assert main(["validate", "--case-study", "2sat", "--layer", "x"]) == 2
    assert "no --layer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: --samples must be a whole number >= 1
        main(["validate", "--case-study", "modular-addition", "--samples", "0"])
    assert e.value.code == 2
    assert "--samples" in capsys.readouterr().err
    assert main(["validate", "--case-study", "modular-addition", "--device", "gpu!"]) == 2
    monkeypatch.setattr(ts, "WEIGHTS", tmp_path / "none.safetensors")
    assert main(["validate", "--case-study", "2sat"]) == 3
    assert "weights are missing" in capsys.readouterr().err
    assert main(["validate", "--run", str(tmp_path)]) == 2  # neither --layer nor --case-study
