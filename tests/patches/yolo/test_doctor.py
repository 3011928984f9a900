"""`python -m shims doctor` on a tiny ultralytics CPU training run (8.4.61, the half path forced as in
test_ultralytics.py): the `.half()` of each validation is reported once per validation at the script's
`model.train(...)` line, naming the EMA and the validator's line; nothing else may be reported but true findings."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import REPO, TESTS, clean_env, marker_line, run_python, write
from tests.patches.yolo.conftest import BUGGY, release

pytestmark = pytest.mark.slow

SCRIPT = """
    import os, sys
    from tests.patches.yolo.ultralytics_run import force_half, write_dataset
    from ultralytics import YOLO

    root = sys.argv[1]
    data = write_dataset(os.path.join(root, "data"))
    model = YOLO("yolov8n.yaml")
    model.add_callback("on_train_start", lambda trainer: force_half(trainer.validator))
    model.train(data=data, epochs=2, imgsz=64, batch=4, nbs=4, workers=0, device="cpu", seed=0, plots=False,  # train
                project=os.path.join(root, "runs"), name="train", exist_ok=True, verbose=False, warmup_epochs=0)
"""


def test_doctor_on_a_tiny_ultralytics_training_run(tmp_path):
    folder = release(BUGGY)
    script = write(tmp_path / "train.py", SCRIPT)
    report = tmp_path / "report.json"
    env = clean_env(YOLO_OFFLINE="1", YOLO_CONFIG_DIR=str(tmp_path / "settings"), SHIMS_REPORT=str(report))
    env["PYTHONPATH"] = os.pathsep.join([REPO, folder, TESTS])  # the ultralytics wheel ships a `tests` package
    run_python(["-m", "shims", "doctor", script, str(tmp_path)], env=env, cwd=str(tmp_path), timeout=600)
    patches = json.loads(report.read_text())["patches"]
    findings = [(name, f) for name, record in patches.items() for f in record.get("findings", [])]
    ours = [f for name, f in findings if name == "yolo"]
    assert len(ours) == 1 and ours[0]["kind"] == "yolo-eval-half" and ours[0]["count"] == 2  # one per validation
    train_line = marker_line(script, "train")
    assert os.path.join(str(tmp_path), ours[0]["where"]).endswith(os.path.basename(train_line)) or \
        ours[0]["where"] == train_line
    with open(os.path.join(folder, "ultralytics", "engine", "validator.py")) as f:
        half_line = next(n for n, text in enumerate(f, 1) if "model.half() if self.args.half" in text)
    assert f"ultralytics/engine/validator.py:{half_line}" in ours[0]["message"]
    assert "trainer's EMA (trainer.ema.ema)" in ours[0]["message"]
    # the only other true finding: the stride probe in DetectionModel.__init__ (eval() then a forward with grad on),
    # once per model built: a one-time cost, never framed as per step
    others = [f for name, f in findings if name != "yolo"]
    for f in others:
        assert f["kind"] == "eval-with-grad" and f.get("per") == "one-time", f
        assert "DetectionModel" in f["message"], f
