#!/usr/bin/env python3
"""The PyTorch side of `sluice bench cuda`: eager PyTorch, the same architecture and weights as Candle.

    python3 bench/torch_runner.py --architecture resnet18 --weights bundle/model.safetensors \
        --input-shape 3,224,224 --inputs rows.f32 --batches 1,32,128,512 --min-seconds 1 \
        --precisions f32,tf32,f16,bf16 --check-rows 128 --check-out check

Uses the machine's own PyTorch (and torchvision for ResNet-18); nothing is installed.
  - digits-cnn: conv1 3x3 pad 1 -> ReLU -> conv2 3x3 pad 1 -> ReLU -> max-pool 2x2 -> flatten ->
    fc1 -> ReLU -> fc2 (inference/src/model/digits_cnn.rs), built here, weights by name;
  - resnet18: torchvision.models.resnet18 with the bundle's weights (torchvision's names).
Precisions: f32 (TF32 off for matmuls and cuDNN), tf32 (on), f16 and bf16 (weights and inputs
converted). Each timed call does what Candle's predict does: inputs from host memory to the
device, the forward pass, softmax, probabilities back as f32. Inputs are little-endian f32 rows.
The probabilities of the first --check-rows rows, per precision, go to CHECK-PRECISION.f32; then
one JSON line per precision and batch size: {"precision": P, "batch": B, "runs": N, "seconds": T}.
"""

import argparse
import json
import time

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn


class DigitsCnn(nn.Module):
    def __init__(self, channels, height, width, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * (height // 2) * (width // 2), 64)
        self.fc2 = nn.Linear(64, classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def build(architecture, weights, shape):
    if architecture == "digits-cnn":
        model = DigitsCnn(*shape, weights["fc2.bias"].shape[0])
    else:
        import torchvision

        model = torchvision.models.resnet18(num_classes=weights["fc.bias"].shape[0])
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not m.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise SystemExit(f"weights do not fit {architecture}: missing {missing}, unexpected {unexpected}")
    return model.eval()


DTYPES = {"f32": torch.float32, "tf32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def set_tf32(on):
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", choices=["digits-cnn", "resnet18"], required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--input-shape", required=True, help="channels,height,width")
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--batches", required=True)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--precisions", default="f32,tf32,f16,bf16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--check-rows", type=int, default=128)
    parser.add_argument("--check-out", required=True, help="path prefix: PREFIX-PRECISION.f32")
    args = parser.parse_args()

    device = torch.device(args.device)
    shape = tuple(int(v) for v in args.input_shape.split(","))
    rows = torch.from_numpy(np.fromfile(args.inputs, dtype="<f4").reshape(-1, *shape))
    model = build(args.architecture, load_file(args.weights), shape).to(device)

    def predict(x, dtype):
        y = model(x.to(device).to(dtype))
        return torch.softmax(y.float(), dim=-1).cpu()

    with torch.inference_mode():
        for precision in args.precisions.split(","):
            dtype = DTYPES[precision]
            set_tf32(precision == "tf32")
            model.to(dtype)
            predict(rows[: args.check_rows], dtype).numpy().astype("<f4").tofile(f"{args.check_out}-{precision}.f32")
            for batch in (int(b) for b in args.batches.split(",")):
                x = rows[torch.arange(batch) % len(rows)].contiguous()
                predict(x, dtype)  # warm-up (cuDNN picks its algorithms here)
                runs, started = 0, time.perf_counter()
                while True:
                    predict(x, dtype)
                    runs += 1
                    elapsed = time.perf_counter() - started
                    if elapsed >= args.min_seconds and runs >= 3:
                        break
                line = {"precision": precision, "batch": batch, "runs": runs, "seconds": elapsed}
                print(json.dumps(line), flush=True)
            model.to(torch.float32)


if __name__ == "__main__":
    main()
