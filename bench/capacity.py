"""The capacity and cost table of docs/deploy.md, from measurements.

    python3 bench/capacity.py bench/results/stages-embedded.json bench/results/stages-aws.json

The first file is `bench/stage_throughput.sh --json` on the embedded store (records/s one worker
process of each stage sustains on this machine: the CPU-bound rate); the second is the same on the
AWS stand-in (AWS requests each stage sends per record, in batches as a backlog fills them).
A task's rate is the lower of its CPU-bound rate (scaled to the task's vCPUs) and the rate AWS
round trips allow when the worker waits for each in turn (REQUEST_MS each, an assumption, not a
measurement). Prices are us-east-1 list prices; every other assumption is named below.
"""

import json
import math
import sys

STAGES = ["ingest", "features", "inference", "results"]
# Task sizes of the prod environment (deploy/cdk/lib/environments.ts), inference on Fargate CPU.
TASK = {"ingest": (1, 2), "features": (2, 4), "inference": (4, 8), "results": (1, 2)}  # vCPU, GB
MEASURED_CORES = 2
REQUEST_MS = 15.0  # assumed mean in-region SQS/DynamoDB/Kinesis round trip
HEADROOM = 1.25  # run tasks and shards at 80% of what they sustain

# List prices, us-east-1.
FARGATE_VCPU_HOUR = 0.04048
FARGATE_GB_HOUR = 0.004445
KINESIS_SHARD_HOUR = 0.015
KINESIS_PUT_UNIT = 0.014 / 1e6  # per 25 KB payload unit; a digits record (411 B) is one
SQS_REQUEST = 0.40 / 1e6  # per request (each 64 KB of a batch); a batch of 10 digits messages is one
DYNAMODB_WRU = 0.625 / 1e6
DYNAMODB_RRU = 0.125 / 1e6
LAMBDA_REQUEST = 0.20 / 1e6
LAMBDA_GB_SECOND = 0.0000166667
STEP_FUNCTIONS_TRANSITION = 0.025 / 1000
SAGEMAKER_M5_LARGE_HOUR = 0.115

# Per record, from the item sizes: a digits feature vector is its 784 pixels, a byte each, with a
# 6-byte header (core/src/vector.rs): under 1 KB, 1 WRU to write and 1 RRU to read strongly
# consistently (inference reads it moments after it was written); a result (under 1 KB) is 1 WRU,
# doubled because it is written in a transaction.
WRU_PER_RECORD = 1 + 2
RRU_PER_RECORD = 1

# The seed architecture, per record: one Lambda invocation per stage (512 MB, 100 ms each), a
# Step Functions standard workflow of 6 state transitions, a SageMaker real-time endpoint of
# ml.m5.large instances each taking 200 records/s (two at least, for availability); the same
# Kinesis stream and DynamoDB writes as sluice.
SEED_LAMBDAS, SEED_LAMBDA_GB_S = 4, 0.5 * 0.1
SEED_TRANSITIONS = 6
SEED_ENDPOINT_RPS, SEED_ENDPOINT_MIN = 200, 2


def per_task_rate(stage, embedded, aws):
    vcpu = TASK[stage][0]
    cpu_bound = embedded[stage]["records_per_s"] * vcpu / MEASURED_CORES
    requests = aws[stage]["aws_requests_per_record"]
    latency_bound = 1000.0 / (requests * REQUEST_MS) if requests else math.inf
    return min(cpu_bound, latency_bound), cpu_bound, latency_bound


def main():
    embedded, aws = (json.load(open(path)) for path in sys.argv[1:3])
    rates = {s: per_task_rate(s, embedded, aws) for s in STAGES}
    requests_per_record = sum(aws[s]["aws_requests_per_record"] for s in STAGES)

    print("Per task (prod sizes; the lower of the two bounds is used):\n")
    print("| stage | task | CPU-bound, measured | AWS round trips, at %g ms each | AWS requests/record, measured |" % REQUEST_MS)
    print("|---|---|---|---|---|")
    for s in STAGES:
        rate, cpu, lat = rates[s]
        vcpu, gb = TASK[s]
        print(f"| {s} | {vcpu} vCPU, {gb} GB | {cpu:,.0f} records/s | {lat:,.0f} records/s | {aws[s]['aws_requests_per_record']:.3f} |")

    print("\nAt a steady rate, per million records:\n")
    print("| records/s | tasks: ingest / features / inference / results | shards | Fargate | Kinesis | SQS | DynamoDB | **sluice** | seed: Lambda + Step Functions + SageMaker | **seed** |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rps in (100, 1_000, 10_000):
        hours = 1e6 / rps / 3600
        tasks = {s: max(1, math.ceil(rps * HEADROOM / rates[s][0])) for s in STAGES}
        # A shard takes 1,000 records/s (or 1 MB/s) of writes, and one ingest task reads it.
        shards = max(math.ceil(rps * HEADROOM / 1000), tasks["ingest"])
        tasks["ingest"] = min(tasks["ingest"], shards)
        fargate = sum(tasks[s] * (TASK[s][0] * FARGATE_VCPU_HOUR + TASK[s][1] * FARGATE_GB_HOUR) for s in STAGES) * hours
        kinesis = shards * KINESIS_SHARD_HOUR * hours + 1e6 * KINESIS_PUT_UNIT
        sqs = 1e6 * requests_per_record * SQS_REQUEST  # every request of the ledger priced as SQS's (the dearest)
        dynamodb = 1e6 * (WRU_PER_RECORD * DYNAMODB_WRU + RRU_PER_RECORD * DYNAMODB_RRU)
        ours = fargate + kinesis + sqs + dynamodb
        lambdas = 1e6 * SEED_LAMBDAS * (LAMBDA_REQUEST + SEED_LAMBDA_GB_S * LAMBDA_GB_SECOND)
        steps = 1e6 * SEED_TRANSITIONS * STEP_FUNCTIONS_TRANSITION
        endpoint = max(SEED_ENDPOINT_MIN, math.ceil(rps / SEED_ENDPOINT_RPS)) * SAGEMAKER_M5_LARGE_HOUR * hours
        seed = lambdas + steps + endpoint + kinesis + dynamodb
        counts = " / ".join(str(tasks[s]) for s in STAGES)
        print(f"| {rps:,} | {counts} | {shards} | ${fargate:.2f} | ${kinesis:.2f} | ${sqs:.2f} | ${dynamodb:.2f} | **${ours:.2f}** "
              f"| ${lambdas:.2f} + ${steps:.2f} + ${endpoint:.2f} | **${seed:.2f}** |")


if __name__ == "__main__":
    main()
