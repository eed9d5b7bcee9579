#!/usr/bin/env python3
"""Writes docs/privacy/accuracy.json, the privacy report's "what DP costs", from two runs of the
inter-patient benchmark (medsplit-bench --json), the same job without and with DP-SGD:

    medsplit-bench --records ../shared/data/mitdb-raw --split inter-patient --modes cyclic-he \
      --epochs 4 --batch-size 32 --hospitals 3 --class-weights '{"fixed": [1, 8, 3, 1, 1]}' \
      --json nodp.json
    (the same with --dp-epsilon 8 --json dp.json)
    scripts/privacy-accuracy.py nodp.json dp.json > docs/privacy/accuracy.json
"""
import json
import sys

COMMAND = ("medsplit-bench --records ../shared/data/mitdb-raw --split inter-patient --modes cyclic-he "
           "--epochs 4 --batch-size 32 --hospitals 3 --class-weights '{\"fixed\": [1, 8, 3, 1, 1]}'")


def figures(path):
    report = json.load(open(path))
    (run,) = [r for r in report["results"] if r["mode"] == "cyclic-he"]
    m = run["metrics"]
    out = {
        "accuracy": m["accuracy"],
        "majority_rate": m["majority_rate"],
        "macro_f1": m["macro_f1"],
        "balanced_accuracy": m["balanced_accuracy"],
        "classes": [{"name": name, "sensitivity": c["se"], "ppv": c["ppv"], "support": c["support"]}
                    for name, c in m["per_class"].items()],
        "seconds_per_epoch": run["seconds_per_epoch"],
    }
    if run.get("dp"):
        dp = run["dp"]
        out["epsilon"] = dp["target_epsilon"]
        out["delta"] = dp["delta"]
        out["clip_norm"] = dp["clip_norm"]
        out["epsilon_per_hospital"] = dp["epsilon_per_hospital"]
    return report, out


def main():
    nodp_report, nodp = figures(sys.argv[1])
    _, dp = figures(sys.argv[2])
    print(json.dumps({
        "task": (f"new patients: DS1 ({nodp_report['train_samples']} beats, 3 hospitals by patient) to DS2 "
                 f"({nodp_report['test_samples']} beats of 22 other patients), AAMI classes, cyclic-he, "
                 "4 rounds, expected batch 32"),
        "evaluation": nodp_report["evaluation"],
        "commands": {"without_dp": COMMAND, "with_dp": COMMAND + " --dp-epsilon 8"},
        "without_dp": nodp,
        "with_dp": dp,
        "accuracy_drop_points": round(100 * (nodp["accuracy"] - dp["accuracy"]), 2),
    }, indent=2))


if __name__ == "__main__":
    main()
