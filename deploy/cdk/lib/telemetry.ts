// Where the workers' OpenTelemetry goes on AWS: an ADOT collector beside each worker takes OTLP
// on localhost and sends metrics to CloudWatch as embedded metric format (EMF) log events, traces
// to X-Ray. The names here are the workers' own (core/src/telemetry/metrics.rs, the inference
// backends); the CDK tests check them against those sources.

/** The AWS Distro for OpenTelemetry collector, pinned: a new version is a reviewed change. */
export const COLLECTOR_IMAGE = 'public.ecr.aws/aws-observability/aws-otel-collector:v0.48.0';
/** OTLP over HTTP, where the workers' `OTEL_EXPORTER_OTLP_ENDPOINT` points. */
export const OTLP_HTTP_PORT = 4318;
/** The collector's health_check extension, which the image's `/healthcheck` asks. */
export const COLLECTOR_HEALTH_PORT = 13133;
/** The collector's share of a task: CPU units, MiB reserved and MiB at most. */
export const COLLECTOR_RESOURCES = { cpu: 128, memoryReservationMiB: 128, memoryLimitMiB: 256 };

/** The metrics the alarms read. */
export const METRICS = {
  inferenceRecords: 'sluice.inference.records',
  breakerState: 'sluice.breaker.state',
  streamTrimmed: 'sluice.stream.trimmed',
} as const;

/** `backend` of `sluice.inference.records`: what scored a batch. */
export const BACKENDS = {
  candleCpu: 'candle-cpu',
  candleCuda: 'candle-cuda',
  sagemaker: 'sagemaker-xgboost',
} as const;

/** `sluice.breaker.state` when the breaker is open (0 closed, 1 half-open). */
export const BREAKER_OPEN = 2;

/**
 * The attributes that become CloudWatch dimensions, each with a handful of values; a set applies
 * to the metrics carrying all its attributes, and `[]` gives every metric its total. Shards,
 * queues, classes, reasons and operations stay fields of the EMF events (Logs Insights reads
 * them) rather than dimensions: each dimension value is a metric of its own, billed monthly.
 */
export const EMF_DIMENSIONS: string[][] = [['stage'], ['backend'], []];

/**
 * Metrics whose OpenTelemetry unit is an annotation (`{record}`, `{entry}`…) or `1`: CloudWatch
 * takes only its own unit names, so the exporter is told theirs.
 */
export const EMF_UNITS: Record<string, 'Count' | 'None'> = {
  'sluice.records.received': 'Count',
  'sluice.records.processed': 'Count',
  'sluice.records.failed': 'Count',
  'sluice.records.arrived': 'Count',
  'sluice.dlq.entries': 'Count',
  'sluice.review.entries': 'Count',
  'sluice.batch.size': 'Count',
  'sluice.queue.messages': 'Count',
  'sluice.stream.leases': 'Count',
  'sluice.stream.trimmed': 'Count',
  'sluice.inference.records': 'Count',
  'sluice.aws.requests': 'Count',
  'sluice.capture.records': 'Count',
  'sluice.prediction.confidence': 'None',
};

export interface CollectorConfigProps {
  /** The CloudWatch namespace of the workers' metrics. */
  namespace: string;
  /** The log group the EMF events go to (the stack makes it, with retention). */
  logGroupName: string;
  /** One worker's stage: its tasks' log streams are `<stage>/<task id>`. */
  stage: string;
}

/**
 * The collector's configuration (the `AOT_CONFIG_CONTENT` it reads; JSON is YAML): OTLP/HTTP in
 * on localhost, ECS task attributes added, metrics out through `awsemf`, traces through
 * `awsxray`, both in the task's region (`AWS_REGION`) with the task role's credentials.
 */
export function collectorConfig(props: CollectorConfigProps): Record<string, unknown> {
  const processors = ['memory_limiter', 'resourcedetection', 'batch'];
  return {
    extensions: { health_check: { endpoint: `127.0.0.1:${COLLECTOR_HEALTH_PORT}` } },
    receivers: { otlp: { protocols: { http: { endpoint: `localhost:${OTLP_HTTP_PORT}` } } } },
    processors: {
      // Refuse data short of the container's hard limit, rather than be killed at it.
      memory_limiter: {
        check_interval: '1s',
        limit_mib: Math.floor(COLLECTOR_RESOURCES.memoryLimitMiB * 0.8),
        spike_limit_mib: Math.floor(COLLECTOR_RESOURCES.memoryLimitMiB * 0.2),
      },
      // The task's ARN, cluster and log group, from the ECS metadata endpoint: X-Ray shows
      // which task a segment came from, and the EMF log stream is named for the task.
      resourcedetection: { detectors: ['ecs'], timeout: '2s', override: false },
      batch: {},
    },
    exporters: {
      awsemf: {
        namespace: props.namespace,
        log_group_name: props.logGroupName,
        log_stream_name: `${props.stage}/{TaskId}`,
        // Exactly the dimension sets declared: the default roll-up would add one per attribute
        // (a metric per shard, per class…).
        dimension_rollup_option: 'NoDimensionRollup',
        // The workers' counters are cumulative from their start, and this collector starts with
        // them: a series' first value is its first delta. Dropping it (the default) would lose
        // rare events entirely, such as a DLQ entry of a new reason.
        retain_initial_value_of_delta_metric: true,
        metric_declarations: [{ dimensions: EMF_DIMENSIONS, metric_name_selectors: ['^sluice\\.'] }],
        metric_descriptors: Object.entries(EMF_UNITS).map(([metric_name, unit]) => ({ metric_name, unit, overwrite: true })),
      },
      awsxray: {},
    },
    service: {
      extensions: ['health_check'],
      pipelines: {
        metrics: { receivers: ['otlp'], processors, exporters: ['awsemf'] },
        traces: { receivers: ['otlp'], processors, exporters: ['awsxray'] },
      },
    },
  };
}
