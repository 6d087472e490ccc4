#!/usr/bin/env python3
"""Train the SageMaker XGBoost fallback on the digits, with the features and split sluice uses.

    python3 deploy/sagemaker/train_xgboost.py [--out DIR]

Writes to DIR (default deploy/sagemaker/model):

- model.tar.gz       exactly one file, `xgboost-model`: the booster in XGBoost's JSON format,
                     which the SageMaker XGBoost 1.7-1 and 3.0-5 containers both load
- metrics.json       held-out accuracy and what produced the model
- test_features.csv  the held-out digits as the worker sends them (no header, no label column)
- test_predictions.csv  xgboost's own class probabilities for those rows, one line per row

Features are what sluice's features stage makes of a digit's PNG: intensities 0..=16 scaled to
0..=255 (rounded half up), then divided by 255. The split is the one in data/digits/README.md.
Training is deterministic (one thread, exact trees, fixed seed).
"""

import argparse
import gzip
import io
import json
import os
import tarfile
import tempfile

import numpy as np
import xgboost as xgb

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DATA = os.path.join(ROOT, "data", "digits", "digits.csv.gz")
CLASSES = 10
PARAMS = {
    "objective": "multi:softprob",
    "num_class": CLASSES,
    "max_depth": 4,
    "eta": 0.3,
    "subsample": 1.0,
    "tree_method": "exact",
    "nthread": 1,
    "seed": 0,
    "eval_metric": "mlogloss",
}
ROUNDS = 200
MIN_ACCURACY = 0.95


def split_of(occurrence):
    """The fixed split of data/digits/README.md (cli/src/digits.rs `split_of`)."""
    if occurrence % 5 == 4:
        return "test"
    if occurrence % 10 == 0:
        return "validation"
    return "train"


def load():
    with gzip.open(DATA, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    pixels, labels = rows[:, :64], rows[:, 64]
    # As the PNG records carry them, and as the features stage reads them back (f32).
    features = (((pixels * 255 + 8) // 16) / 255.0).astype(np.float32)
    seen = [0] * CLASSES
    splits = []
    for label in labels:
        splits.append(split_of(seen[label]))
        seen[label] += 1
    splits = np.array(splits)
    return {s: (features[splits == s], labels[splits == s]) for s in ("train", "validation", "test")}


def csv_rows(matrix):
    # repr of a float32 as Rust prints it: the shortest text that reads back as the same value.
    return "".join(",".join(repr(float(v)) for v in row) + "\n" for row in matrix)


def pack(booster, out):
    with tempfile.TemporaryDirectory() as tmp:
        # XGBoost picks the format from the extension: JSON, then stored under the name the
        # containers look for.
        path = os.path.join(tmp, "xgboost-model.json")
        booster.save_model(path)
        data = open(path, "rb").read()
    info = tarfile.TarInfo("xgboost-model")
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data))
    with open(os.path.join(out, "model.tar.gz"), "wb") as f:
        # mtime 0: the archive depends only on the model.
        with gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
            gz.write(buffer.getvalue())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "deploy", "sagemaker", "model"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    data = load()
    dtrain = xgb.DMatrix(*data["train"])
    dval = xgb.DMatrix(*data["validation"])
    booster = xgb.train(PARAMS, dtrain, ROUNDS, evals=[(dval, "validation")], verbose_eval=False)

    test_x, test_y = data["test"]
    probabilities = booster.predict(xgb.DMatrix(test_x))
    accuracy = float((probabilities.argmax(axis=1) == test_y).mean())
    metrics = {
        "xgboost": xgb.__version__,
        "params": PARAMS,
        "rounds": ROUNDS,
        "train_rows": int(len(data["train"][1])),
        "test_rows": int(len(test_y)),
        "test_accuracy": accuracy,
    }
    pack(booster, args.out)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    with open(os.path.join(args.out, "test_features.csv"), "w") as f:
        f.write(csv_rows(test_x))
    with open(os.path.join(args.out, "test_predictions.csv"), "w") as f:
        f.write(csv_rows(probabilities))
    print(json.dumps(metrics))
    if accuracy < MIN_ACCURACY:
        raise SystemExit(f"held-out accuracy {accuracy:.4f} is under {MIN_ACCURACY}")


if __name__ == "__main__":
    main()
