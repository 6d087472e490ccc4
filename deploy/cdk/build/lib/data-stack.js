"use strict";
var __createBinding = (this && this.__createBinding) || (Object.create ? (function(o, m, k, k2) {
    if (k2 === undefined) k2 = k;
    var desc = Object.getOwnPropertyDescriptor(m, k);
    if (!desc || ("get" in desc ? !m.__esModule : desc.writable || desc.configurable)) {
      desc = { enumerable: true, get: function() { return m[k]; } };
    }
    Object.defineProperty(o, k2, desc);
}) : (function(o, m, k, k2) {
    if (k2 === undefined) k2 = k;
    o[k2] = m[k];
}));
var __setModuleDefault = (this && this.__setModuleDefault) || (Object.create ? (function(o, v) {
    Object.defineProperty(o, "default", { enumerable: true, value: v });
}) : function(o, v) {
    o["default"] = v;
});
var __importStar = (this && this.__importStar) || (function () {
    var ownKeys = function(o) {
        ownKeys = Object.getOwnPropertyNames || function (o) {
            var ar = [];
            for (var k in o) if (Object.prototype.hasOwnProperty.call(o, k)) ar[ar.length] = k;
            return ar;
        };
        return ownKeys(o);
    };
    return function (mod) {
        if (mod && mod.__esModule) return mod;
        var result = {};
        if (mod != null) for (var k = ownKeys(mod), i = 0; i < k.length; i++) if (k[i] !== "default") __createBinding(result, mod, k[i]);
        __setModuleDefault(result, mod);
        return result;
    };
})();
Object.defineProperty(exports, "__esModule", { value: true });
exports.DataStack = void 0;
exports.pascal = pascal;
// The pipeline's state: the records stream, the stage queues and their DLQs, the review queue,
// the feature/result/lease/counter tables and the claim-check bucket, each named as the workers
// expect from their prefix. Kept apart from the compute stack so that the workers can be
// replaced, resized or torn down without touching a record.
const aws_cdk_lib_1 = require("aws-cdk-lib");
const dynamodb = __importStar(require("aws-cdk-lib/aws-dynamodb"));
const kinesis = __importStar(require("aws-cdk-lib/aws-kinesis"));
const s3 = __importStar(require("aws-cdk-lib/aws-s3"));
const sqs = __importStar(require("aws-cdk-lib/aws-sqs"));
const resources_1 = require("./resources");
/** SQS keeps a message at most 14 days: DLQ and review entries wait that long for people. */
const DLQ_RETENTION = aws_cdk_lib_1.Duration.days(14);
/** Work queues keep a message 4 days (SQS's default): less than their DLQs, as SQS requires. */
const WORK_RETENTION = aws_cdk_lib_1.Duration.days(4);
class DataStack extends aws_cdk_lib_1.Stack {
    prefix;
    stream;
    /** Every queue by its name in resources.json (`features`, `ingest-dlq`, `review`…). */
    queues = new Map();
    tables = new Map();
    bucket;
    constructor(scope, id, props) {
        super(scope, id, props);
        const { config, prefix } = props;
        this.prefix = prefix;
        const removalPolicy = config.retain ? aws_cdk_lib_1.RemovalPolicy.RETAIN : aws_cdk_lib_1.RemovalPolicy.DESTROY;
        const name = (n) => (0, resources_1.resourceName)(prefix, n);
        this.stream = new kinesis.Stream(this, 'Records', {
            streamName: name(resources_1.RESOURCES.stream),
            ...(config.shards === 'on-demand'
                ? { streamMode: kinesis.StreamMode.ON_DEMAND }
                : { streamMode: kinesis.StreamMode.PROVISIONED, shardCount: config.shards }),
            retentionPeriod: config.streamRetention,
            encryption: kinesis.StreamEncryption.MANAGED,
            removalPolicy,
        });
        const maxReceiveCount = (0, resources_1.configNumber)('store.max_receives');
        const visibilityTimeout = aws_cdk_lib_1.Duration.millis((0, resources_1.configNumber)('store.visibility_timeout_ms'));
        // DLQs (and review) first: the work queues' redrive policies name them.
        const redriveTargets = new Set(Object.values(resources_1.RESOURCES.redrive));
        const all = Object.keys(resources_1.RESOURCES.queues);
        const order = [...all.filter((q) => !(q in resources_1.RESOURCES.redrive)), ...all.filter((q) => q in resources_1.RESOURCES.redrive)];
        for (const queue of order) {
            const dlqName = resources_1.RESOURCES.redrive[queue];
            const held = redriveTargets.has(queue) || !dlqName;
            const created = new sqs.Queue(this, pascal(queue), {
                queueName: name(resources_1.RESOURCES.queues[queue]),
                encryption: sqs.QueueEncryption.SQS_MANAGED,
                enforceSSL: true,
                visibilityTimeout,
                retentionPeriod: held ? DLQ_RETENTION : WORK_RETENTION,
                deadLetterQueue: dlqName ? { queue: this.queues.get(dlqName), maxReceiveCount } : undefined,
                removalPolicy,
            });
            this.queues.set(queue, created);
            if (!dlqName) {
                aws_cdk_lib_1.Validations.of(created).acknowledge({
                    id: 'AwsSolutions-SQS3',
                    reason: queue === 'review'
                        ? 'The review queue is worked through by people (sluice review), not by a consumer that can fail: a dead-letter queue behind it would only hide items from them.'
                        : 'This is a dead-letter queue itself; operators inspect and replay it (sluice dlq).',
                });
            }
        }
        for (const [key, spec] of Object.entries(resources_1.RESOURCES.tables)) {
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
            this.tables.set(key, table);
        }
        this.bucket = new s3.Bucket(this, 'Claims', {
            bucketName: name(resources_1.RESOURCES.bucket),
            blockPublicAccess: s3.BlockPublicAccess.BLOCK_ALL,
            encryption: s3.BucketEncryption.S3_MANAGED,
            enforceSSL: true,
            lifecycleRules: [
                // Claim-checks and offloaded feature vectors are content-addressed copies that only
                // matter while their records are in flight (and in DLQs, which keep 14 days at most).
                { id: 'expire-claim-checks', prefix: resources_1.RESOURCES.claim_check_key_prefix, expiration: config.claimCheckExpiry },
                { id: 'abort-incomplete-uploads', abortIncompleteMultipartUploadAfter: aws_cdk_lib_1.Duration.days(1) },
            ],
            removalPolicy,
        });
        aws_cdk_lib_1.Validations.of(this.bucket).acknowledge({
            id: 'AwsSolutions-S1',
            reason: 'Only the workers read and write claim-checks, by content hash; object-level access is audited with CloudTrail data events where an account turns them on, not with a second bucket of access logs.',
        });
        new aws_cdk_lib_1.CfnOutput(this, 'Prefix', { value: prefix, description: 'store.aws.prefix of every worker' });
        new aws_cdk_lib_1.CfnOutput(this, 'StreamName', { value: this.stream.streamName });
    }
    queue(name) {
        const queue = this.queues.get(name);
        if (!queue)
            throw new Error(`no queue ${name} in resources.json`);
        return queue;
    }
    table(name) {
        return this.tables.get(name);
    }
}
exports.DataStack = DataStack;
/** `ingest-dlq` → `IngestDlq`, for construct ids. */
function pascal(name) {
    return name.replace(/(^|-)([a-z])/g, (_, __, c) => c.toUpperCase());
}
