"""Both MedMNIST plugins loaded at once on ONE backbone: test AUC per task, plugin sizes, and agreement with each
run's own predictions. Run by benchmarks/medmnist.sh; prints a Markdown table and writes OUT/shared_backbone.json."""

import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from medtriad.data.layout import load_dataset, read_splits
from medtriad.inference.predictor import Predictor
from medtriad.io import write_json
from medtriad.models.anymc3d import read_plugin_metadata
from medtriad.models.adapters import count_parameters


def main(out: Path) -> None:
    plugins = [out / "plugin-adrenal" / "plugins" / "adrenal.safetensors",
               out / "plugin-vessel" / "plugins" / "vessel.safetensors"]
    shared = Predictor.from_plugins(out / "plugin-adrenal" / "backbone", plugins, device="cpu")
    result = {"backbone_parameters": count_parameters(shared.model.encoder, trainable_only=False), "tasks": {}}
    for task in ("adrenal", "vessel"):
        plugin = shared.model.plugins[task]
        spec, cases = load_dataset(out / task)
        test = set(read_splits(out / task)["test"])
        probs, targets = [], []
        for case in (c for c in cases if c.case_id in test):
            pred = shared.predict([case.image_files[0]], case_id=case.case_id)
            probs.append(list(pred.probabilities[task].values())[1])
            targets.append(case.classes[task])
        alone = json.loads((out / f"plugin-{task}" / "evaluation_test" / "summary.json").read_text())
        result["tasks"][task] = {
            "test_auc_shared_backbone": roc_auc_score(targets, probs),
            "test_auc_own_run": alone["classification"][task]["auc"],
            "plugin_trainable_parameters": plugin.parameter_counts(),
            "plugin_file_bytes": plugins[0 if task == "adrenal" else 1].stat().st_size,
            "adapter": read_plugin_metadata(plugins[0 if task == "adrenal" else 1])["config"]["adapter"],
        }
    write_json(out / "shared_backbone.json", result)
    print(f"backbone parameters (frozen): {result['backbone_parameters']}")
    print("| task | test AUC, both plugins on one backbone | test AUC, own run | plugin params (inference) | file |")
    print("|---|---|---|---|---|")
    for task, r in result["tasks"].items():
        print(f"| {task} | {r['test_auc_shared_backbone']:.3f} | {r['test_auc_own_run']:.3f} | "
              f"{r['plugin_trainable_parameters']['inference']:,} | {r['plugin_file_bytes'] / 1e6:.2f} MB |")
    for name in ("adrenal", "vessel"):
        for kind in ("cnn", "plugin"):
            summary = json.loads((out / f"{kind}-{name}" / "evaluation_test" / "summary.json").read_text())
            m = summary["classification"][name]
            print(f"{kind}-{name}: test AUC {m['auc']:.3f}, ACC {m.get('accuracy', np.nan):.3f} on "
                  f"{summary['num_cases']} cases")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
