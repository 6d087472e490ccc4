// How much work one task of each stage does, from the measurements in bench/results (docs/deploy.md
// says how they were made), and the autoscaling targets that follow from it. bench/capacity.py
// prints the capacity and cost table from the same files by the same rule.
import * as fs from 'fs';
import * as path from 'path';
import { REPO_ROOT, Stage } from './resources';

interface StageMeasurement {
  records_per_s: number;
  aws_requests_per_record: number;
}
type Measurements = Record<Stage, StageMeasurement> & { cores: number };

function measurements(file: string): Measurements {
  return JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'bench', 'results', file), 'utf8'));
}

/** One worker process per stage draining a backlog on the embedded store: the CPU-bound rate. */
const EMBEDDED = measurements('stages-embedded.json');
/** The same on the AWS stand-in: the AWS requests each stage sends per record. */
const AWS = measurements('stages-aws.json');
/** An assumed mean in-region round trip to SQS, DynamoDB or Kinesis (not measured here). */
export const REQUEST_MS = 15;

/**
 * Records per second one task of `stage` with `vcpu` vCPUs sustains: the lower of its CPU-bound
 * rate (measured on `EMBEDDED.cores` cores, scaled) and the rate its AWS round trips allow when
 * the worker waits for each in turn.
 */
export function perTaskRate(stage: Stage, vcpu: number): number {
  const cpuBound = (EMBEDDED[stage].records_per_s * vcpu) / EMBEDDED.cores;
  const requests = AWS[stage].aws_requests_per_record;
  const latencyBound = requests > 0 ? 1000 / (requests * REQUEST_MS) : Infinity;
  return Math.min(cpuBound, latencyBound);
}

/**
 * The backlog per task at which a stage still meets its latency goal: a task that clears
 * `perTaskRate` records a second works through `target` waiting messages in
 * `acceptableLatencySeconds`, so target = acceptable latency ÷ per-message time.
 */
export function backlogPerTaskTarget(stage: Stage, acceptableLatencySeconds: number, vcpu: number): number {
  return Math.max(1, Math.floor(acceptableLatencySeconds * perTaskRate(stage, vcpu)));
}
