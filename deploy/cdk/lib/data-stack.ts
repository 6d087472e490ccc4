// The pipeline's state: the records stream, the stage queues and their DLQs, the review queue,
// the feature/result/lease/counter tables and the claim-check bucket, each named as the workers
// expect from their prefix. Kept apart from the compute stack so that the workers can be
// replaced, resized or torn down without touching a record.
import { CfnOutput, Duration, RemovalPolicy, Stack, StackProps, Validations } from 'aws-cdk-lib';
import * as dynamodb from 'aws-cdk-lib/aws-dynamodb';
import * as kinesis from 'aws-cdk-lib/aws-kinesis';
import * as s3 from 'aws-cdk-lib/aws-s3';
import * as sqs from 'aws-cdk-lib/aws-sqs';
import { Construct } from 'constructs';
import { EnvironmentConfig } from './environments';
import { RESOURCES, TableName, configNumber, resourceName } from './resources';

export interface DataStackProps extends StackProps {
  config: EnvironmentConfig;
  /** Every resource is named `<prefix>-…` (the workers' `store.aws.prefix`). */
  prefix: string;
}

/**
 * Every queue keeps a message SQS's most, 14 days. SQS drops a message past its retention without
 * a DLQ entry, so a work queue keeps it as long as it can: a stage stopped for days loses nothing
 * in that time (with SQS's default of 4 days, a long weekend would). An entry a worker
 * dead-letters is a new message, kept 14 days more; one SQS moves to a DLQ (max receives) keeps
 * its first enqueue time, and has in its DLQ what is left of its 14 days (the `…-near-expiry`
 * alarms warn at 10 days in a queue).
 */
export const QUEUE_RETENTION = Duration.days(14);

export class DataStack extends Stack {
  readonly prefix: string;
  readonly stream: kinesis.Stream;
  /** Every queue by its name in resources.json (`features`, `ingest-dlq`, `review`…). */
  readonly queues = new Map<string, sqs.Queue>();
  readonly tables = new Map<TableName, dynamodb.Table>();
  readonly bucket: s3.Bucket;

  constructor(scope: Construct, id: string, props: DataStackProps) {
    super(scope, id, props);
    const { config, prefix } = props;
    this.prefix = prefix;
    const removalPolicy = config.retain ? RemovalPolicy.RETAIN : RemovalPolicy.DESTROY;
    // A claim-check is stored before its record enters the stream, which keeps it up to its
    // retention; then a work queue and its DLQ, up to QUEUE_RETENTION each (an entry a worker
    // dead-letters is a new message).
    if (config.claimCheckExpiry.toDays() <= config.streamRetention.toDays() + 2 * QUEUE_RETENTION.toDays()) {
      throw new Error(`claim-checks must outlive a record in the stream, then a work queue and its DLQ (${config.name})`);
    }
    const name = (n: string) => resourceName(prefix, n);

    this.stream = new kinesis.Stream(this, 'Records', {
      streamName: name(RESOURCES.stream),
      ...(config.shards === 'on-demand'
        ? { streamMode: kinesis.StreamMode.ON_DEMAND }
        : { streamMode: kinesis.StreamMode.PROVISIONED, shardCount: config.shards }),
      retentionPeriod: config.streamRetention,
      encryption: kinesis.StreamEncryption.MANAGED,
      removalPolicy,
    });

    const maxReceiveCount = configNumber('store.max_receives');
    const visibilityTimeout = Duration.millis(configNumber('store.visibility_timeout_ms'));
    // DLQs (and review) first: the work queues' redrive policies name them.
    const all = Object.keys(RESOURCES.queues);
    const order = [...all.filter((q) => !(q in RESOURCES.redrive)), ...all.filter((q) => q in RESOURCES.redrive)];
    for (const queue of order) {
      const dlqName = RESOURCES.redrive[queue];
      const created = new sqs.Queue(this, pascal(queue), {
        queueName: name(RESOURCES.queues[queue]),
        encryption: sqs.QueueEncryption.SQS_MANAGED,
        enforceSSL: true,
        visibilityTimeout,
        // SQS's most (since 2025): photo-sized envelopes travel eight to a call, not in S3.
        maxMessageSizeBytes: 1024 * 1024,
        retentionPeriod: QUEUE_RETENTION,
        deadLetterQueue: dlqName ? { queue: this.queues.get(dlqName)!, maxReceiveCount } : undefined,
        removalPolicy,
      });
      this.queues.set(queue, created);
      if (!dlqName) {
        Validations.of(created).acknowledge(
          {
            id: 'AwsSolutions-SQS3',
            reason:
              queue === 'review'
                ? 'The review queue is worked through by people (sluice review), not by a consumer that can fail: a dead-letter queue behind it would only hide items from them.'
                : 'This is a dead-letter queue itself; operators inspect and replay it (sluice dlq).',
          },
        )
      }
    }

    for (const [key, spec] of Object.entries(RESOURCES.tables) as [TableName, (typeof RESOURCES.tables)[TableName]][]) {
      const table = new dynamodb.Table(this, `${pascal(key)}Table`, {
        tableName: name(spec.name),
        partitionKey: { name: spec.key, type: dynamodb.AttributeType.STRING },
        billingMode: dynamodb.BillingMode.PAY_PER_REQUEST,
        pointInTimeRecoverySpecification: { pointInTimeRecoveryEnabled: true },
        encryption: dynamodb.TableEncryption.AWS_MANAGED,
        timeToLiveAttribute: spec.ttl_attribute,
        deletionProtection: config.retain,
        removalPolicy,
      });
      if (spec.index) {
        table.addGlobalSecondaryIndex({
          indexName: spec.index.name,
          partitionKey: { name: spec.index.partition, type: dynamodb.AttributeType.STRING },
          sortKey: { name: spec.index.sort, type: dynamodb.AttributeType.STRING },
          projectionType: dynamodb.ProjectionType.ALL,
        });
      }
      this.tables.set(key, table);
    }

    this.bucket = new s3.Bucket(this, 'Claims', {
      bucketName: name(RESOURCES.bucket),
      blockPublicAccess: s3.BlockPublicAccess.BLOCK_ALL,
      encryption: s3.BucketEncryption.S3_MANAGED,
      enforceSSL: true,
      lifecycleRules: [
        // Claim-checks and offloaded feature vectors are content-addressed copies that only
        // matter while their records are in flight or in a DLQ (environments.ts says how long).
        { id: 'expire-claim-checks', prefix: RESOURCES.claim_check_key_prefix, expiration: config.claimCheckExpiry },
        // Prediction capture: kept past the monitor's window, for reports and audits.
        { id: 'expire-capture', prefix: RESOURCES.capture_key_prefix, expiration: config.captureExpiry },
        { id: 'abort-incomplete-uploads', abortIncompleteMultipartUploadAfter: Duration.days(1) },
      ],
      removalPolicy,
    });
    Validations.of(this.bucket).acknowledge(
      {
        id: 'AwsSolutions-S1',
        reason:
          'Only the workers read and write claim-checks, by content hash; object-level access is audited with CloudTrail data events where an account turns them on, not with a second bucket of access logs.',
      },
    )

    new CfnOutput(this, 'Prefix', { value: prefix, description: 'store.aws.prefix of every worker' });
    new CfnOutput(this, 'StreamName', { value: this.stream.streamName });
  }

  queue(name: string): sqs.Queue {
    const queue = this.queues.get(name);
    if (!queue) throw new Error(`no queue ${name} in resources.json`);
    return queue;
  }

  table(name: TableName): dynamodb.Table {
    return this.tables.get(name)!;
  }
}

/** `ingest-dlq` → `IngestDlq`, for construct ids. */
export function pascal(name: string): string {
  return name.replace(/(^|-)([a-z])/g, (_, __, c: string) => c.toUpperCase());
}
