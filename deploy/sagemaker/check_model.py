#!/usr/bin/env python3
"""Check a packed fallback model the way a SageMaker XGBoost container loads it.

    python3 deploy/sagemaker/check_model.py [DIR]

DIR holds what train_xgboost.py wrote. The archive must hold exactly `xgboost-model`; the booster
is loaded from that extension-less file (as the containers do) and must reproduce
test_predictions.csv. Run it under xgboost 1.7.x and 3.0.x to cover both container versions.
"""

import os
import sys
import tarfile
import tempfile

import numpy as np
import xgboost as xgb

here = os.path.dirname(os.path.abspath(__file__))
model_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "model")
with tarfile.open(os.path.join(model_dir, "model.tar.gz")) as tar, tempfile.TemporaryDirectory() as tmp:
    names = tar.getnames()
    if names != ["xgboost-model"]:
        raise SystemExit(f"model.tar.gz must hold exactly xgboost-model, not {names}")
    tar.extractall(tmp)
    booster = xgb.Booster()
    booster.load_model(os.path.join(tmp, "xgboost-model"))
features = np.loadtxt(os.path.join(model_dir, "test_features.csv"), delimiter=",", dtype=np.float32)
expected = np.loadtxt(os.path.join(model_dir, "test_predictions.csv"), delimiter=",")
error = float(np.abs(booster.predict(xgb.DMatrix(features)) - expected).max())
print(f"xgboost {xgb.__version__}: loaded; largest difference from the training run {error:.3g}")
if error > 1e-6:
    raise SystemExit("predictions differ")
