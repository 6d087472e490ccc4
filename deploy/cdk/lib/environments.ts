// beta and prod: one app, two sizes (`cdk deploy -c env=beta|prod`).
import { Duration } from 'aws-cdk-lib';
import { RetentionDays } from 'aws-cdk-lib/aws-logs';
import { Stage } from './resources';

/** A worker service's task size (Fargate CPU units and MiB) and task-count bounds. */
export interface WorkerSizing {
  cpu: number;
  memoryMiB: number;
  minTasks: number;
  maxTasks: number;
}

export interface EnvironmentConfig {
  name: 'beta' | 'prod';
  /** Provisioned shards, or 'on-demand' (Kinesis sizes itself; ingest then scales up to maxTasks). */
  shards: number | 'on-demand';
  streamRetention: Duration;
  workers: Record<Stage, WorkerSizing>;
  /** The GPU capacity for inference (with `-c inference=gpu`, the default). */
  gpu: { instanceType: string; maxInstances: number; cpu: number; memoryMiB: number };
  /** Seconds a record may wait in one stage's queue; autoscaling targets follow from it. */
  acceptableLatencySeconds: number;
  /** Review items waiting for people before the alarm rings. */
  reviewBacklogAlarm: number;
  natGateways: number;
  logRetention: RetentionDays;
  /**
   * Claim-checks and offloaded vectors are deleted this long after they were written: longer than
   * a record can live in the stream and then a work queue and its DLQ (the stream's retention + 14
   * + 14 days: an entry a worker dead-letters is a new message), so a replay finds them.
   */
  claimCheckExpiry: Duration;
  /** How long prediction capture is kept (longer than the monitor's window, 7 days by default). */
  captureExpiry: Duration;
  /** Results expire this many days after they are written (DynamoDB TTL); 0 keeps them. */
  resultTtlDays: number;
  /** Stateful resources survive `cdk destroy`; tables and stream refuse deletion. */
  retain: boolean;
  fallback: { instanceType: string; instanceCount: number };
  telemetry: TelemetryConfig;
}

/** Where the workers' OpenTelemetry metrics and traces go on AWS (lib/telemetry.ts). */
export interface TelemetryConfig {
  /**
   * An ADOT collector beside each worker: metrics to CloudWatch (EMF), traces to X-Ray, and the
   * alarms on those metrics. Off: the workers export nothing over OTLP and serve only /metrics.
   */
  collector: boolean;
  /** The share of traces kept (parent-based: a record's spans are kept or dropped together). */
  traceSampleRatio: number;
  /**
   * The share of records the SageMaker fallback may score, over 15 minutes, before the alarm
   * rings: above it the Candle model is failing or slow and the breaker routes around it.
   */
  fallbackShareAlarm: number;
}

export const ENVIRONMENTS: Record<'beta' | 'prod', EnvironmentConfig> = {
  beta: {
    name: 'beta',
    shards: 2,
    streamRetention: Duration.hours(24),
    workers: {
      ingest: { cpu: 512, memoryMiB: 1024, minTasks: 1, maxTasks: 2 },
      features: { cpu: 1024, memoryMiB: 2048, minTasks: 1, maxTasks: 4 },
      inference: { cpu: 2048, memoryMiB: 4096, minTasks: 1, maxTasks: 4 },
      results: { cpu: 512, memoryMiB: 1024, minTasks: 1, maxTasks: 2 },
    },
    gpu: { instanceType: 'g4dn.xlarge', maxInstances: 2, cpu: 3584, memoryMiB: 14336 },
    acceptableLatencySeconds: 10,
    reviewBacklogAlarm: 1000,
    natGateways: 1,
    logRetention: RetentionDays.ONE_MONTH,
    claimCheckExpiry: Duration.days(30),
    captureExpiry: Duration.days(30),
    resultTtlDays: 30,
    retain: false,
    fallback: { instanceType: 'ml.m5.large', instanceCount: 1 },
    telemetry: { collector: true, traceSampleRatio: 1, fallbackShareAlarm: 0.5 },
  },
  prod: {
    name: 'prod',
    shards: 8,
    streamRetention: Duration.days(7),
    workers: {
      ingest: { cpu: 1024, memoryMiB: 2048, minTasks: 2, maxTasks: 8 },
      features: { cpu: 2048, memoryMiB: 4096, minTasks: 2, maxTasks: 20 },
      inference: { cpu: 4096, memoryMiB: 8192, minTasks: 2, maxTasks: 20 },
      results: { cpu: 1024, memoryMiB: 2048, minTasks: 2, maxTasks: 10 },
    },
    gpu: { instanceType: 'g5.xlarge', maxInstances: 8, cpu: 3584, memoryMiB: 14336 },
    acceptableLatencySeconds: 5,
    reviewBacklogAlarm: 5000,
    natGateways: 2,
    logRetention: RetentionDays.ONE_YEAR,
    claimCheckExpiry: Duration.days(36),
    captureExpiry: Duration.days(400),
    resultTtlDays: 0,
    retain: true,
    fallback: { instanceType: 'ml.m5.large', instanceCount: 2 },
    // X-Ray bills each span: a span per record per stage adds up at prod's rates.
    telemetry: { collector: true, traceSampleRatio: 0.1, fallbackShareAlarm: 0.2 },
  },
};
