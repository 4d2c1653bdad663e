"""The public API: `import retrain` is light, and the calls the README shows work."""

import subprocess
import sys

from conftest import EXAMPLES, UNSEEN


def test_import_retrain_is_light():
    code = ("import sys, retrain; heavy = [m for m in ('numpy', 'onnxruntime', 'torch', 'scipy') "
            "if m in sys.modules]; assert not heavy, heavy; print(sorted(dir(retrain)))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    for name in ("fit", "label", "evaluate", "export", "FitConfig", "Classifier", "Run"):
        assert name in p.stdout


def test_fit_classify_evaluate_through_the_api(tmp_path):
    import retrain
    import retrain.fit  # importing the module first must not hide the function

    out = tmp_path / "run"
    report = retrain.fit(retrain.FitConfig(image_dir=str(EXAMPLES), output=str(out), quiet=True))
    assert report["labels"] == ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    assert retrain.Run(out).report()["labels"] == report["labels"]
    photo = UNSEEN / "daisy" / "10555815624_dc211569b0.jpg"
    got = retrain.Classifier(out).classify([str(photo)], top_k=2)
    assert got[0]["path"] == str(photo) and len(got[0]["predictions"]) == 2
    assert got[0]["predictions"][0]["score"] >= got[0]["predictions"][1]["score"]
    assert retrain.label(out, [str(photo)])[0]["predictions"] == retrain.Classifier(out).classify([str(photo)])[0]["predictions"]
    m = retrain.evaluate(out, UNSEEN, quiet=True)
    assert m["n"] == sum(1 for _ in UNSEEN.rglob("*.jpg")) and 0.5 <= m["accuracy"] <= 1.0
