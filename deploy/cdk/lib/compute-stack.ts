// The workers: one ECS service per stage (Fargate; inference on EC2 GPU capacity, or Fargate
// CPU with `-c inference=cpu`), each with a task role reaching only its own stage's resources,
// scaled on backlog per task (ingest: on the stream's shards and iterator age), logs with
// retention, an ADOT collector beside each worker (metrics to CloudWatch, traces to X-Ray),
// alarms to an SNS topic, the SageMaker XGBoost fallback endpoint, and the model monitor as an
// hourly scheduled task (monitor.ts).
import { Aws, CfnMapping, CfnOutput, Duration, RemovalPolicy, Stack, StackProps, Validations } from 'aws-cdk-lib';
import * as appscaling from 'aws-cdk-lib/aws-applicationautoscaling';
import * as autoscaling from 'aws-cdk-lib/aws-autoscaling';
import * as cloudwatch from 'aws-cdk-lib/aws-cloudwatch';
import * as cw_actions from 'aws-cdk-lib/aws-cloudwatch-actions';
import * as ec2 from 'aws-cdk-lib/aws-ec2';
import * as ecr from 'aws-cdk-lib/aws-ecr';
import { Platform } from 'aws-cdk-lib/aws-ecr-assets';
import * as ecs from 'aws-cdk-lib/aws-ecs';
import * as iam from 'aws-cdk-lib/aws-iam';
import * as kms from 'aws-cdk-lib/aws-kms';
import * as logs from 'aws-cdk-lib/aws-logs';
import * as s3assets from 'aws-cdk-lib/aws-s3-assets';
import * as sagemaker from 'aws-cdk-lib/aws-sagemaker';
import * as sns from 'aws-cdk-lib/aws-sns';
import * as subs from 'aws-cdk-lib/aws-sns-subscriptions';
import { Construct } from 'constructs';
import { backlogPerTaskTarget } from './capacity';
import { ScheduledMonitor, bucketObjects } from './monitor';
import { DataStack, QUEUE_RETENTION, pascal } from './data-stack';
import { EnvironmentConfig } from './environments';
import { REPO_ROOT, RESOURCES, STAGES, Stage, configNumber, resourceName } from './resources';
import {
  BACKENDS,
  BREAKER_OPEN,
  COLLECTOR_HEALTH_PORT,
  COLLECTOR_IMAGE,
  COLLECTOR_RESOURCES,
  METRICS,
  OTLP_HTTP_PORT,
  collectorConfig,
} from './telemetry';

/** How old a queue's oldest message gets before its `…-near-expiry` alarm: 4 days before SQS drops it. */
const NEAR_EXPIRY = Duration.days(10);

export interface ComputeStackProps extends StackProps {
  config: EnvironmentConfig;
  data: DataStack;
  /** `gpu`: inference on EC2 GPU instances (CUDA image); `cpu`: on Fargate (CPU image). */
  inference: 'gpu' | 'cpu';
  /** The worker image and its CUDA variant: pushed already (`uri`), or built from `dockerfile`. */
  images: { cpu: ImageSource; cuda: ImageSource };
  /** The fallback's `model.tar.gz` (deploy/sagemaker/train_xgboost.py); none: no fallback. */
  fallbackModel?: string;
  /** Overrides the region's built-in SageMaker XGBoost 1.7-1 image. */
  fallbackImage?: string;
  /** Subscribed to the alarm topic, if given. */
  alarmEmail?: string;
  /** What the producers' raw records and claim-checks need of ingest and features. */
  producers?: ProducerOptions;
  /**
   * `store.aws.inline_vector_bytes`: feature vectors larger than this go to S3 rather than stay
   * in their DynamoDB item (cheaper for image models; docs/deploy.md). Default: the workers'.
   */
  inlineVectorBytes?: number;
}

/** Producer settings the workers take from the stack (docs/producers.md). */
export interface ProducerOptions {
  /** A raw JSON event's field naming its record id (`ingest.record_id_field`). */
  recordIdField?: string;
  /**
   * Producers' own buckets claim-checks may point into (`store.aws.claim_check_buckets`): ingest
   * and features may read (and list) them. A bucket of another account must grant that too.
   */
  claimCheckBuckets?: string[];
}

/** An image pushed already, or to build from a Dockerfile of the repository (a CDK asset). */
export interface ImageSource {
  uri?: string;
  dockerfile: string;
}

/** `ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPOSITORY[:TAG]`, in parts. */
const ECR_URI = /^(\d{12})\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?\/([^:@]+)(?::([^@]+))?$/;

/** Where the images keep the model bundle the workers load. */
const MODEL_DIR = '/opt/sluice/models/digits';
/** ECS sends SIGTERM, then SIGKILL this long after (Fargate allows up to 120 s). */
const STOP_TIMEOUT = Duration.seconds(60);
/** A worker finishes or returns its in-flight batch within this, well inside STOP_TIMEOUT. */
const SHUTDOWN_GRACE = Duration.seconds(45);

/** Where the collectors send the workers' telemetry. */
export interface TelemetryDestinations {
  /** The CloudWatch namespace of the workers' metrics. */
  namespace: string;
  /** The log group the EMF events land in (CloudWatch extracts the metrics from it). */
  metricsLogs: logs.LogGroup;
  /** Its name, as the collectors' configuration spells it. */
  metricsLogGroupName: string;
}

/**
 * Accounts that host SageMaker's built-in XGBoost image (`sagemaker-xgboost:1.7-1`), by region,
 * from SageMaker's "Docker registry paths" table; other regions: `-c fallbackImage=URI`.
 */
const XGBOOST_IMAGE_ACCOUNTS: Record<string, string> = {
  'us-east-1': '683313688378',
  'us-east-2': '257758044811',
  'us-west-1': '746614075791',
  'us-west-2': '246618743249',
  'ca-central-1': '341280168497',
  'eu-west-1': '141502667606',
  'eu-west-2': '764974769150',
  'eu-central-1': '492215442770',
  'eu-north-1': '662702820516',
  'ap-northeast-1': '354813040037',
  'ap-northeast-2': '366743142698',
  'ap-southeast-1': '121021644041',
  'ap-southeast-2': '783357654285',
  'ap-south-1': '720646828776',
  'sa-east-1': '737474898029',
};

export class ComputeStack extends Stack {
  readonly services = new Map<Stage, ecs.BaseService>();
  readonly taskRoles = new Map<Stage, iam.Role>();
  readonly alarmTopic: sns.Topic;
  /** `sluice monitor`, hourly, alerts to the alarm topic. */
  readonly monitor: ScheduledMonitor;
  /** None when `telemetry.collector` is off. */
  readonly telemetry?: TelemetryDestinations;

  constructor(scope: Construct, id: string, props: ComputeStackProps) {
    super(scope, id, props);
    const { config, data } = props;

    const vpc = new ec2.Vpc(this, 'Vpc', {
      maxAzs: 2,
      natGateways: config.natGateways,
      subnetConfiguration: [
        { name: 'public', subnetType: ec2.SubnetType.PUBLIC, cidrMask: 24 },
        { name: 'workers', subnetType: ec2.SubnetType.PRIVATE_WITH_EGRESS, cidrMask: 20 },
      ],
      // S3 and DynamoDB traffic stays off the NAT gateways (and off their per-GB charge).
      gatewayEndpoints: {
        S3: { service: ec2.GatewayVpcEndpointAwsService.S3 },
        DynamoDB: { service: ec2.GatewayVpcEndpointAwsService.DYNAMODB },
      },
      flowLogs: {
        rejected: {
          destination: ec2.FlowLogDestination.toCloudWatchLogs(
            new logs.LogGroup(this, 'FlowLogs', { retention: config.logRetention }),
          ),
          trafficType: ec2.FlowLogTrafficType.REJECT,
        },
      },
    });
    const cluster = new ecs.Cluster(this, 'Cluster', {
      vpc,
      // RunningTaskCount, the divisor of backlog per task, comes from Container Insights.
      containerInsightsV2: ecs.ContainerInsights.ENABLED,
    });
    const securityGroup = new ec2.SecurityGroup(this, 'Workers', {
      vpc,
      description: 'sluice workers: outbound HTTPS to AWS APIs only, nothing inbound',
      allowAllOutbound: false,
    });
    securityGroup.addEgressRule(ec2.Peer.anyIpv4(), ec2.Port.tcp(443), 'AWS APIs (Kinesis, SQS, DynamoDB, S3, SageMaker)');

    const fallback = props.fallbackModel
      ? this.fallbackEndpoint(`${data.prefix}-fallback`, props.fallbackModel, props.fallbackImage, config)
      : undefined;
    this.telemetry = config.telemetry.collector ? this.telemetryDestinations(data.prefix, config) : undefined;

    const environment: Record<string, string> = {
      SLUICE__STORE__BACKEND: 'aws',
      SLUICE__STORE__AWS__PREFIX: data.prefix,
      SLUICE__STORE__AWS__REGION: this.region,
      SLUICE__STORE__MAX_RECEIVES: String(configNumber('store.max_receives')),
      SLUICE__STORE__VISIBILITY_TIMEOUT_MS: String(configNumber('store.visibility_timeout_ms')),
      SLUICE__WORKER__SHUTDOWN_GRACE_MS: String(SHUTDOWN_GRACE.toMilliseconds()),
      SLUICE__STORE__AWS__RESULT_TTL_DAYS: String(config.resultTtlDays),
      // Feature vectors live as long as claim-checks (offloaded ones are claim-checks), which
      // outlive a message in a work queue and its DLQ: a replay finds its vector.
      SLUICE__STORE__AWS__FEATURE_TTL_DAYS: String(config.claimCheckExpiry.toDays()),
      ...(props.inlineVectorBytes === undefined ? {} : { SLUICE__STORE__AWS__INLINE_VECTOR_BYTES: String(props.inlineVectorBytes) }),
      SLUICE__MODEL__DIR: MODEL_DIR,
      RUST_LOG: 'info',
    };
    const producers = props.producers ?? {};
    const producerBuckets = producers.claimCheckBuckets ?? [];
    if (producerBuckets.length > 0) {
      // A list as the configuration reads one from the environment, each name quoted (text).
      environment.SLUICE__STORE__AWS__CLAIM_CHECK_BUCKETS = JSON.stringify(producerBuckets);
    }

    for (const stage of STAGES) {
      const sizing = config.workers[stage];
      const role = new iam.Role(this, `${pascal(stage)}TaskRole`, {
        assumedBy: new iam.ServicePrincipal('ecs-tasks.amazonaws.com'),
        description: `sluice-${stage}: only what the ${stage} worker calls`,
      });
      for (const statement of this.workerStatements(stage, data, fallback, producerBuckets)) role.addToPolicy(statement);
      Validations.of(role).acknowledge(
        {
          id: `AwsSolutions-IAM5[Resource::${claimCheckObjects(data, '<AWS::Partition>')}]`,
          reason: 'Claim-checks are keyed by their content hash under one prefix: the worker cannot know the keys in advance, and reaches nothing else in the bucket.',
        },
        {
          id: `AwsSolutions-IAM5[Resource::${bucketObjects(data, RESOURCES.capture_key_prefix, '<AWS::Partition>')}]`,
          reason: 'Capture objects are keyed by the time they are written under one prefix: the results worker cannot know the keys in advance, and writes nothing else there.',
        },
      );
      if (readsProducerObjects(stage)) {
        for (const entry of producerBuckets) {
          Validations.of(role).acknowledge({
            id: `AwsSolutions-IAM5[Resource::${producerObjects(entry, '<AWS::Partition>')}]`,
            reason: "A producer's claim-checks are keyed as the producer chooses: read only, in the bucket it names.",
          });
        }
      }
      if (this.telemetry) this.grantTelemetry(role, this.telemetry);
      this.taskRoles.set(stage, role);
      const logGroup = new logs.LogGroup(this, `${pascal(stage)}Logs`, { retention: config.logRetention });
      const stageEnvironment = {
        ...environment,
        ...(stage === 'inference' && fallback ? { SLUICE__INFERENCE__SAGEMAKER__ENDPOINT_NAME: fallback.attrEndpointName } : {}),
        ...(stage === 'ingest' && producers.recordIdField ? { SLUICE__INGEST__RECORD_ID_FIELD: producers.recordIdField } : {}),
        ...(this.telemetry ? otelEnvironment(stage, config) : {}),
      };
      const gpu = stage === 'inference' && props.inference === 'gpu';
      const container: ecs.ContainerDefinitionOptions = {
        image: this.containerImage(gpu ? 'CudaImage' : 'Image', gpu ? props.images.cuda : props.images.cpu),
        command: [`/usr/local/bin/sluice-${stage}`],
        environment: stageEnvironment,
        logging: ecs.LogDrivers.awsLogs({ logGroup, streamPrefix: stage }),
        readonlyRootFilesystem: true,
        stopTimeout: STOP_TIMEOUT,
        essential: true,
        // The worker asks its own /healthz (the images have no curl); the start period covers
        // loading the model.
        healthCheck: {
          command: ['CMD', `/usr/local/bin/sluice-${stage}`, '--healthcheck'],
          interval: Duration.seconds(30),
          timeout: Duration.seconds(5),
          retries: 3,
          startPeriod: Duration.seconds(60),
        },
      };
      const service = gpu
        ? this.gpuService(cluster, vpc, securityGroup, role, container, config)
        : this.fargateService(stage, cluster, securityGroup, role, container, sizing);
      if (this.telemetry) this.addCollector(stage, service.taskDefinition, logGroup, this.telemetry);
      this.services.set(stage, service);
      this.scale(stage, cluster, service, data, config);
    }

    this.alarmTopic = this.alarms(data, config, props.alarmEmail);
    this.monitor = new ScheduledMonitor(this, 'Monitor', {
      data,
      config,
      cluster,
      securityGroup,
      image: this.containerImage('Image', props.images.cpu),
      topic: this.alarmTopic,
      environment,
    });
    new CfnOutput(this, 'ClusterName', { value: cluster.clusterName });
    new CfnOutput(this, 'AlarmTopic', { value: this.alarmTopic.topicArn });
  }

  /**
   * The image of `source`: an ECR image through its repository (so the execution role is granted
   * the pull), another registry's as it is, or a CDK asset built from the Dockerfile.
   */
  private containerImage(id: string, source: ImageSource): ecs.ContainerImage {
    // Built for the tasks' x86_64 wherever `cdk deploy` runs (an arm64 laptop would build arm64).
    if (!source.uri) return ecs.ContainerImage.fromAsset(REPO_ROOT, { file: source.dockerfile, platform: Platform.LINUX_AMD64 });
    const ecrImage = ECR_URI.exec(source.uri);
    if (!ecrImage) return ecs.ContainerImage.fromRegistry(source.uri);
    const [, account, region, repositoryName, tag] = ecrImage;
    const repository = (this.node.tryFindChild(id) as ecr.IRepository | undefined) ??
      ecr.Repository.fromRepositoryAttributes(this, id, {
        repositoryArn: `arn:${Aws.PARTITION}:ecr:${region}:${account}:repository/${repositoryName}`,
        repositoryName,
      });
    return ecs.ContainerImage.fromEcrRepository(repository, tag ?? 'latest');
  }

  /**
   * The namespace and the log group of the workers' metrics: named for the prefix, so two
   * deployments in one account and region keep theirs apart.
   */
  private telemetryDestinations(prefix: string, config: EnvironmentConfig): TelemetryDestinations {
    const metricsLogGroupName = `/sluice/${prefix}/metrics`;
    const metricsLogs = new logs.LogGroup(this, 'MetricsLogs', {
      logGroupName: metricsLogGroupName,
      retention: config.logRetention,
      // A named group left behind would stop the next deployment of the same prefix.
      removalPolicy: config.retain ? RemovalPolicy.RETAIN : RemovalPolicy.DESTROY,
    });
    return { namespace: `sluice/${prefix}`, metricsLogs, metricsLogGroupName };
  }

  /** What the collector beside a worker calls, with the worker's task role. */
  private grantTelemetry(role: iam.Role, telemetry: TelemetryDestinations): void {
    // awsemf writes EMF events to its log group's streams (the group's ARN ends in `:*`); the
    // services, which depend on their task roles, start once the group exists. No
    // logs:CreateLogGroup: the stack makes the group, with retention; one the exporter made
    // would keep its events forever.
    role.addToPolicy(
      new iam.PolicyStatement({
        sid: 'MetricsAsEmfLogs',
        actions: ['logs:CreateLogStream', 'logs:PutLogEvents', 'logs:DescribeLogStreams'],
        resources: [telemetry.metricsLogs.logGroupArn],
      }),
    );
    role.addToPolicy(
      new iam.PolicyStatement({ sid: 'TracesToXRay', actions: ['xray:PutTraceSegments', 'xray:PutTelemetryRecords'], resources: ['*'] }),
    );
    Validations.of(role).acknowledge({
      id: 'AwsSolutions-IAM5[Resource::*]',
      reason: 'The collector sends traces with xray:PutTraceSegments and xray:PutTelemetryRecords, which have no resource-level permissions: AWS allows only "*".',
    });
  }

  /**
   * The ADOT collector beside `stage`'s worker: not essential (a collector that fails leaves the
   * worker running, and ECS restarts it), logging to the worker's log group. The worker starts
   * after it and, stopping first, flushes its last metrics and spans to a collector still there.
   */
  private addCollector(stage: Stage, task: ecs.TaskDefinition, logGroup: logs.ILogGroup, telemetry: TelemetryDestinations): void {
    const worker = task.defaultContainer!;
    const collector = task.addContainer('otel-collector', {
      image: ecs.ContainerImage.fromRegistry(COLLECTOR_IMAGE),
      essential: false,
      enableRestartPolicy: true,
      ...COLLECTOR_RESOURCES,
      readonlyRootFilesystem: true,
      environment: {
        AOT_CONFIG_CONTENT: JSON.stringify(
          collectorConfig({ namespace: telemetry.namespace, logGroupName: telemetry.metricsLogGroupName, stage }),
        ),
        AWS_REGION: this.region,
      },
      logging: ecs.LogDrivers.awsLogs({ logGroup, streamPrefix: 'otel-collector' }),
      healthCheck: {
        command: ['CMD', '/healthcheck', `--port=${COLLECTOR_HEALTH_PORT}`],
        interval: Duration.seconds(30),
        timeout: Duration.seconds(5),
        retries: 3,
        startPeriod: Duration.seconds(10),
      },
    });
    worker.addContainerDependencies({ container: collector, condition: ecs.ContainerDependencyCondition.START });
  }

  /** Exactly the calls a worker of `stage` makes, on exactly its resources. */
  private workerStatements(
    stage: Stage,
    data: DataStack,
    fallback: sagemaker.CfnEndpoint | undefined,
    producerBuckets: string[],
  ): iam.PolicyStatement[] {
    const spec = RESOURCES.stages[stage];
    const statements: iam.PolicyStatement[] = [];
    const allow = (sid: string, actions: string[], resources: string[]) =>
      statements.push(new iam.PolicyStatement({ sid, actions, resources }));
    if (spec.input) {
      allow('ConsumeInputQueue', ['sqs:ReceiveMessage', 'sqs:DeleteMessage', 'sqs:ChangeMessageVisibility', 'sqs:GetQueueUrl', 'sqs:GetQueueAttributes'], [data.queue(spec.input).queueArn]);
    }
    // GetQueueAttributes: a send over 256 KiB asks the queue its MaximumMessageSize, and each
    // worker samples its DLQ's depth (and results, the review queue's) for the queue metrics.
    allow('SendDownstreamAndDlq', ['sqs:SendMessage', 'sqs:GetQueueUrl', 'sqs:GetQueueAttributes'], [...spec.sends, spec.dlq].map((q) => data.queue(q).queueArn));
    // Messages and DLQ entries over SQS's 256 KiB travel as claim-checks; so do large payloads.
    allow('ClaimChecks', ['s3:GetObject', 's3:PutObject'], [claimCheckObjects(data)]);
    // Listing the bucket makes S3 answer a key that is gone (expired by the bucket's lifecycle)
    // with NoSuchKey, the record's `claim_check_missing`, rather than AccessDenied, which the
    // workers take for a deployment that may not read its own bucket, and stop. Unconditioned:
    // a GetObject carries no s3:prefix, so a condition on it would never hold (as the monitor's).
    // GetEncryptionConfiguration: an object refused alone under another KMS key than the
    // bucket's (a producer's) is that record's failure, not the deployment's.
    allow('ClaimCheckKeys', ['s3:ListBucket', 's3:GetEncryptionConfiguration'], [claimCheckBucket(data)]);
    if (readsProducerObjects(stage) && producerBuckets.length > 0) {
      // Read only; listed for the same reason as the own bucket (a key gone is NoSuchKey).
      allow('ProducerClaimChecks', ['s3:GetObject'], producerBuckets.map((entry) => producerObjects(entry)));
      const buckets = [...new Set(producerBuckets.map((entry) => entry.split('/')[0]))];
      allow('ProducerClaimCheckKeys', ['s3:ListBucket'], buckets.map((b) => `arn:${Aws.PARTITION}:s3:::${b}`));
    }
    // Every worker adds its AWS request counts to the counters table (`sluice stats`).
    const counters = data.table('counters').tableArn;
    switch (stage) {
      case 'ingest':
        allow('ReadStream', ['kinesis:ListShards', 'kinesis:GetShardIterator', 'kinesis:GetRecords', 'kinesis:DescribeStreamSummary'], [data.stream.streamArn]);
        allow('ShardLeases', ['dynamodb:Scan', 'dynamodb:GetItem', 'dynamodb:PutItem', 'dynamodb:UpdateItem'], [data.table('leases').tableArn]);
        allow('RequestCounters', ['dynamodb:UpdateItem'], [counters]);
        break;
      case 'features':
        allow('WriteFeatures', ['dynamodb:BatchWriteItem'], [data.table('features').tableArn]);
        allow('RequestCounters', ['dynamodb:UpdateItem'], [counters]);
        break;
      case 'inference':
        allow('ReadFeatures', ['dynamodb:BatchGetItem'], [data.table('features').tableArn]);
        allow('RequestCounters', ['dynamodb:UpdateItem'], [counters]);
        if (fallback) {
          allow('InvokeFallback', ['sagemaker:InvokeEndpoint'], [
            Stack.of(this).formatArn({ service: 'sagemaker', resource: 'endpoint', resourceName: fallback.endpointName!.toLowerCase() }),
          ]);
        }
        break;
      case 'results':
        // One TransactWriteItems per batch: conditional puts of results plus the status counters.
        allow('WriteResults', ['dynamodb:PutItem', 'dynamodb:BatchGetItem'], [data.table('results').tableArn]);
        allow('ResultCountersAndRequests', ['dynamodb:UpdateItem'], [counters]);
        // Prediction capture: a chunk of lines per object; tabular records with their vectors.
        allow('CapturePredictions', ['s3:PutObject'], [bucketObjects(data, RESOURCES.capture_key_prefix)]);
        allow('ReadFeaturesForCapture', ['dynamodb:BatchGetItem'], [data.table('features').tableArn]);
        break;
    }
    return statements;
  }

  private fargateService(
    stage: Stage,
    cluster: ecs.Cluster,
    securityGroup: ec2.SecurityGroup,
    taskRole: iam.Role,
    container: ecs.ContainerDefinitionOptions,
    sizing: { cpu: number; memoryMiB: number },
  ): ecs.FargateService {
    const task = new ecs.FargateTaskDefinition(this, `${pascal(stage)}Task`, {
      cpu: sizing.cpu,
      memoryLimitMiB: sizing.memoryMiB,
      taskRole,
      runtimePlatform: { cpuArchitecture: ecs.CpuArchitecture.X86_64, operatingSystemFamily: ecs.OperatingSystemFamily.LINUX },
      // Fargate has no tmpfs: /tmp, the one writable path, is task storage.
      volumes: [{ name: 'tmp' }],
    });
    task.addContainer(stage, container).addMountPoints({ containerPath: '/tmp', sourceVolume: 'tmp', readOnly: false });
    this.suppressExecutionRole(task);
    return new ecs.FargateService(this, `${pascal(stage)}Service`, {
      cluster,
      taskDefinition: task,
      securityGroups: [securityGroup],
      vpcSubnets: { subnetType: ec2.SubnetType.PRIVATE_WITH_EGRESS },
      assignPublicIp: false,
      minHealthyPercent: 100,
      circuitBreaker: { rollback: true },
    });
  }

  /** Inference on GPU instances: the ECS GPU-optimised AMI, a capacity provider, one GPU a task. */
  private gpuService(
    cluster: ecs.Cluster,
    vpc: ec2.Vpc,
    securityGroup: ec2.SecurityGroup,
    taskRole: iam.Role,
    container: ecs.ContainerDefinitionOptions,
    config: EnvironmentConfig,
  ): ecs.Ec2Service {
    const instanceRole = new iam.Role(this, 'GpuInstanceRole', {
      assumedBy: new iam.ServicePrincipal('ec2.amazonaws.com'),
      managedPolicies: [iam.ManagedPolicy.fromAwsManagedPolicyName('service-role/AmazonEC2ContainerServiceforEC2Role')],
    });
    const group = new autoscaling.AutoScalingGroup(this, 'GpuInstances', {
      vpc,
      vpcSubnets: { subnetType: ec2.SubnetType.PRIVATE_WITH_EGRESS },
      launchTemplate: new ec2.LaunchTemplate(this, 'GpuLaunchTemplate', {
        instanceType: new ec2.InstanceType(config.gpu.instanceType),
        machineImage: ecs.EcsOptimizedImage.amazonLinux2023(ecs.AmiHardwareType.GPU),
        role: instanceRole,
        securityGroup,
        requireImdsv2: true,
        userData: ec2.UserData.forLinux(),
        blockDevices: [{ deviceName: '/dev/xvda', volume: ec2.BlockDeviceVolume.ebs(60, { encrypted: true }) }],
      }),
      minCapacity: 0,
      maxCapacity: config.gpu.maxInstances,
      // The capacity provider's managed termination protection needs new instances protected.
      newInstancesProtectedFromScaleIn: true,
    });
    const provider = new ecs.AsgCapacityProvider(this, 'GpuCapacity', {
      autoScalingGroup: group,
      enableManagedScaling: true,
      enableManagedTerminationProtection: true,
    });
    cluster.addAsgCapacityProvider(provider);
    const task = new ecs.Ec2TaskDefinition(this, 'InferenceGpuTask', { networkMode: ecs.NetworkMode.AWS_VPC, taskRole });
    task.addContainer('inference', {
      ...container,
      gpuCount: 1,
      cpu: config.gpu.cpu,
      memoryReservationMiB: config.gpu.memoryMiB,
    });
    this.suppressExecutionRole(task);
    Validations.of(group).acknowledge(
        { id: 'AwsSolutions-AS3', reason: 'The ECS capacity provider drives this group; its scaling shows in the ECS service events, not in ASG notifications.' },
        { id: 'AwsSolutions-EC26', reason: 'The root volume is encrypted (blockDevices encrypted: true); the rule cannot see through the launch template.' },
      )
    Validations.of(instanceRole).acknowledge(
        {
          id: 'AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/AmazonEC2ContainerServiceforEC2Role]',
          reason: 'AmazonEC2ContainerServiceforEC2Role is the policy AWS maintains for the ECS agent on container instances.',
        },
        {
          id: 'AwsSolutions-IAM5[Action::ecs:Submit*]',
          reason: 'The ECS agent reports task and container state changes of its own instance; CDK adds this for every capacity provider.',
        },
        {
          id: 'AwsSolutions-IAM5[Resource::*]',
          reason: 'ecs:Submit*, ecs:Poll, ecs:StartTelemetrySession and ecr:GetAuthorizationToken, which the ECS agent needs, take no narrower resource.',
        },
      )
    return new ecs.Ec2Service(this, 'InferenceService', {
      cluster,
      taskDefinition: task,
      securityGroups: [securityGroup],
      vpcSubnets: { subnetType: ec2.SubnetType.PRIVATE_WITH_EGRESS },
      capacityProviderStrategies: [{ capacityProvider: provider.capacityProviderName, weight: 1 }],
      // One GPU a task, no spare GPU for a second copy: a deployment replaces half at a time.
      minHealthyPercent: 50,
      maxHealthyPercent: 100,
      circuitBreaker: { rollback: true },
    });
  }

  private suppressExecutionRole(task: ecs.TaskDefinition): void {
    Validations.of(task).acknowledge(
        {
          id: 'AwsSolutions-IAM5[Resource::*]',
          reason: 'The execution role pulls the image: ecr:GetAuthorizationToken has no resource-level permissions, so AWS allows only "*" for it.',
        },
        { id: 'AwsSolutions-ECS2', reason: 'Environment variables hold configuration (SLUICE__…), never secrets: credentials come from the task role.' },
      )
  }

  /**
   * SQS-fed stages scale on backlog per task (visible messages ÷ running tasks, by metric math)
   * toward acceptable latency ÷ per-message time; ingest scales with iterator age, up to one task
   * per shard.
   */
  private scale(stage: Stage, cluster: ecs.Cluster, service: ecs.BaseService, data: DataStack, config: EnvironmentConfig): void {
    const sizing = config.workers[stage];
    const input = RESOURCES.stages[stage].input;
    const gpu = service instanceof ecs.Ec2Service;
    // Ingest: one consumer per shard is the most that helps. GPU inference: one task per GPU.
    const maxTasks = gpu
      ? Math.min(sizing.maxTasks, config.gpu.maxInstances)
      : !input && config.shards !== 'on-demand'
        ? Math.min(sizing.maxTasks, config.shards)
        : sizing.maxTasks;
    const target = new appscaling.ScalableTarget(this, `${pascal(stage)}Scaling`, {
      serviceNamespace: appscaling.ServiceNamespace.ECS,
      resourceId: `service/${cluster.clusterName}/${service.serviceName}`,
      scalableDimension: 'ecs:service:DesiredCount',
      minCapacity: Math.min(sizing.minTasks, maxTasks),
      maxCapacity: maxTasks,
    });
    if (!input) {
      target.scaleOnMetric('IteratorAge', {
        metric: data.stream.metricGetRecordsIteratorAgeMilliseconds({ statistic: 'Maximum', period: Duration.minutes(1) }),
        scalingSteps: [
          { upper: 5_000, change: -1 },
          { lower: 30_000, change: +1 },
          { lower: 120_000, change: +2 },
        ],
        adjustmentType: appscaling.AdjustmentType.CHANGE_IN_CAPACITY,
        cooldown: Duration.minutes(3),
      });
      return;
    }
    const vcpu = gpu ? config.gpu.cpu / 1024 : sizing.cpu / 1024;
    // Target tracking on metric math has no L2 construct (it accepts only single metrics).
    new appscaling.CfnScalingPolicy(this, `${pascal(stage)}BacklogPerTask`, {
      policyName: `${data.prefix}-${stage}-backlog-per-task`,
      policyType: 'TargetTrackingScaling',
      scalingTargetId: target.scalableTargetId,
      targetTrackingScalingPolicyConfiguration: {
        targetValue: backlogPerTaskTarget(stage, config.acceptableLatencySeconds, vcpu),
        scaleOutCooldown: 60,
        // Scale in slowly: a task stopped mid-batch returns its messages, but costs a redelivery.
        scaleInCooldown: 300,
        customizedMetricSpecification: {
          metrics: [
            {
              id: 'visible',
              metricStat: {
                metric: {
                  namespace: 'AWS/SQS',
                  metricName: 'ApproximateNumberOfMessagesVisible',
                  dimensions: [{ name: 'QueueName', value: data.queue(input).queueName }],
                },
                stat: 'Sum',
              },
              returnData: false,
            },
            {
              id: 'tasks',
              metricStat: {
                metric: {
                  namespace: 'ECS/ContainerInsights',
                  metricName: 'RunningTaskCount',
                  dimensions: [
                    { name: 'ClusterName', value: cluster.clusterName },
                    { name: 'ServiceName', value: service.serviceName },
                  ],
                },
                stat: 'Average',
              },
              returnData: false,
            },
            { id: 'backlog_per_task', expression: 'visible / IF(tasks > 0, tasks, 1)', label: 'Backlog per task', returnData: true },
          ],
        },
      },
    });
  }

  private alarms(data: DataStack, config: EnvironmentConfig, email?: string): sns.Topic {
    // CloudWatch can publish only to topics whose key lets it: a key of our own, not aws/sns.
    const key = new kms.Key(this, 'AlarmKey', { enableKeyRotation: true, description: 'sluice alarm topic' });
    key.grant(new iam.ServicePrincipal('cloudwatch.amazonaws.com'), 'kms:Decrypt', 'kms:GenerateDataKey*');
    const topic = new sns.Topic(this, 'Alarms', { masterKey: key, enforceSSL: true, displayName: `sluice ${config.name} alarms` });
    if (email) topic.addSubscription(new subs.EmailSubscription(email));
    const action = new cw_actions.SnsAction(topic);
    const alarm = (id: string, props: cloudwatch.AlarmProps) => {
      const created = new cloudwatch.Alarm(this, id, props);
      created.addAlarmAction(action);
      created.addOkAction(action);
    };
    for (const stage of STAGES) {
      const dlq = data.queue(RESOURCES.stages[stage].dlq);
      alarm(`${pascal(stage)}DlqNotEmpty`, {
        alarmName: `${data.prefix}-${stage}-dlq-not-empty`,
        alarmDescription: `Records the ${stage} stage could not process are waiting in ${dlq.queueName}: sluice dlq list --stage ${stage}`,
        metric: dlq.metricApproximateNumberOfMessagesVisible({ statistic: 'Maximum', period: Duration.minutes(5) }),
        threshold: 0,
        comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        evaluationPeriods: 1,
        treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
      });
    }
    // A queue whose oldest message only ages: its stage's workers are stopped (a worker stops
    // when AWS refuses the deployment, and ECS keeps restarting it) or cannot keep up.
    for (const stage of STAGES) {
      const input = RESOURCES.stages[stage].input;
      if (!input) continue;
      const queue = data.queue(input);
      alarm(`${pascal(stage)}QueueStalled`, {
        alarmName: `${data.prefix}-${stage}-queue-stalled`,
        alarmDescription: `A message has waited over 15 minutes in ${queue.queueName}: are the ${stage} workers running? A worker that AWS refuses logs "the deployment refuses this stage's work" and exits`,
        metric: queue.metricApproximateAgeOfOldestMessage({ statistic: 'Maximum', period: Duration.minutes(5) }),
        threshold: 15 * 60,
        comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        evaluationPeriods: 1,
        treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
      });
    }
    // SQS drops a message past its retention without a DLQ entry: a record waiting anywhere
    // (stage stopped, DLQ entry unreplayed, review item unsettled) is warned of 4 days before.
    for (const queue of Object.keys(RESOURCES.queues)) {
      const held = data.queue(queue);
      alarm(`${pascal(queue)}NearExpiry`, {
        alarmName: `${data.prefix}-${queue}-near-expiry`,
        alarmDescription: `A message has waited over ${NEAR_EXPIRY.toDays()} days in ${held.queueName}; SQS deletes it ${QUEUE_RETENTION.toDays()} days after it was sent (one SQS moved to a DLQ: after it was first sent to its work queue), with no DLQ entry: process, replay or settle it now (docs/operations.md)`,
        metric: held.metricApproximateAgeOfOldestMessage({ statistic: 'Maximum', period: Duration.hours(1) }),
        threshold: NEAR_EXPIRY.toSeconds(),
        comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        evaluationPeriods: 1,
        treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
      });
    }
    alarm('ReviewBacklog', {
      alarmName: `${data.prefix}-review-backlog`,
      alarmDescription: `More than ${config.reviewBacklogAlarm} low-confidence predictions wait for people: sluice results --status review`,
      metric: data.queue('review').metricApproximateNumberOfMessagesVisible({ statistic: 'Maximum', period: Duration.minutes(5) }),
      threshold: config.reviewBacklogAlarm,
      comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
      evaluationPeriods: 3,
      treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
    });
    alarm('IteratorAge', {
      alarmName: `${data.prefix}-stream-iterator-age`,
      alarmDescription: 'Ingest is more than a minute behind the stream (GetRecords iterator age)',
      metric: data.stream.metricGetRecordsIteratorAgeMilliseconds({ statistic: 'Maximum', period: Duration.minutes(1) }),
      threshold: 60_000,
      comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
      evaluationPeriods: 5,
      treatMissingData: cloudwatch.TreatMissingData.BREACHING,
    });
    if (this.telemetry) this.telemetryAlarms(data.prefix, this.telemetry.namespace, config, alarm);
    return topic;
  }

  /**
   * Alarms on the workers' own metrics (from the collectors, through EMF): the SageMaker
   * fallback scoring more than its share of records, the model's breaker staying open, and a
   * shard taken up past the stream's retention.
   * Periods without inference count as fine (the breaker's gauge is read at each collection: with
   * no batches it reads half-open once its open time is up).
   */
  private telemetryAlarms(
    prefix: string,
    namespace: string,
    config: EnvironmentConfig,
    alarm: (id: string, props: cloudwatch.AlarmProps) => void,
  ): void {
    const period = Duration.minutes(5);
    const records = (backend: string) =>
      new cloudwatch.Metric({ namespace, metricName: METRICS.inferenceRecords, dimensionsMap: { backend }, statistic: 'Sum', period });
    const share = config.telemetry.fallbackShareAlarm;
    alarm('FallbackShare', {
      alarmName: `${prefix}-inference-fallback-share`,
      alarmDescription:
        `The SageMaker fallback scored more than ${Math.round(share * 100)}% of records for 15 minutes: the Candle model is failing or slow, ` +
        'so the circuit breaker sends batches to SageMaker. Read the sluice-inference logs ("Candle failed") and ' +
        `sluice_breaker_state on its /metrics (${METRICS.breakerState} in ${namespace}; 2 = open).`,
      // A backend that scored nothing in a period counts 0 (inference=cpu has no candle-cuda).
      metric: new cloudwatch.MathExpression({
        expression: 'FILL(sagemaker, 0) / (FILL(cpu, 0) + FILL(cuda, 0) + FILL(sagemaker, 0))',
        usingMetrics: {
          cpu: records(BACKENDS.candleCpu),
          cuda: records(BACKENDS.candleCuda),
          sagemaker: records(BACKENDS.sagemaker),
        },
        label: 'Share of records scored by the SageMaker fallback',
        period,
      }),
      threshold: share,
      comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
      evaluationPeriods: 3,
      datapointsToAlarm: 3,
      treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
    });
    alarm('StreamTrimmed', {
      alarmName: `${prefix}-stream-trimmed`,
      alarmDescription:
        'An ingest worker took a shard up after no worker had read it for longer than the stream keeps records: records ' +
        'that arrived meanwhile may have been trimmed unread, with no result and no DLQ entry. The sluice-ingest logs ' +
        '("no worker read this shard") name the shard and the times; docs/operations.md says what can be done.',
      metric: new cloudwatch.Metric({ namespace, metricName: METRICS.streamTrimmed, statistic: 'Sum', period }),
      threshold: 0,
      comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
      evaluationPeriods: 1,
      treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
    });
    alarm('BreakerOpen', {
      alarmName: `${prefix}-inference-breaker-open`,
      alarmDescription:
        'An inference task\'s model circuit breaker was open in each of the last three 5-minute periods: its batches go to ' +
        'the SageMaker fallback. Read the sluice-inference logs for Candle\'s errors; sluice_breaker_state on each task\'s ' +
        '/metrics says which (0 closed, 1 half-open, 2 open).',
      metric: new cloudwatch.Metric({ namespace, metricName: METRICS.breakerState, statistic: 'Maximum', period }),
      threshold: BREAKER_OPEN,
      comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
      evaluationPeriods: 3,
      datapointsToAlarm: 3,
      treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
    });
  }

  /** The SageMaker XGBoost endpoint inference falls back to (deploy/sagemaker's model). */
  private fallbackEndpoint(endpointName: string, modelPath: string, image: string | undefined, config: EnvironmentConfig): sagemaker.CfnEndpoint {
    const artifact = new s3assets.Asset(this, 'FallbackModelArtifact', { path: modelPath });
    const role = new iam.Role(this, 'FallbackRole', {
      assumedBy: new iam.ServicePrincipal('sagemaker.amazonaws.com'),
      description: 'SageMaker hosting of the XGBoost fallback: its model artifact, image, logs and metrics',
    });
    const stack = Stack.of(this);
    role.addToPolicy(
      new iam.PolicyStatement({
        sid: 'ReadModelArtifact',
        actions: ['s3:GetObject'],
        resources: [`arn:${stack.partition}:s3:::${artifact.s3BucketName}/${artifact.s3ObjectKey}`],
      }),
    );
    let imageUri = image;
    let repository: string | undefined;
    if (image === undefined) {
      const accounts = new CfnMapping(this, 'XgboostImageAccounts', {
        lazy: true,
        mapping: Object.fromEntries(Object.entries(XGBOOST_IMAGE_ACCOUNTS).map(([region, account]) => [region, { account }])),
      });
      const imageAccount = accounts.findInMap(stack.region, 'account');
      imageUri = `${imageAccount}.dkr.ecr.${stack.region}.${stack.urlSuffix}/sagemaker-xgboost:1.7-1`;
      repository = `arn:${stack.partition}:ecr:${stack.region}:${imageAccount}:repository/sagemaker-xgboost`;
    } else {
      const ecrImage = ECR_URI.exec(image);
      if (ecrImage) repository = `arn:${stack.partition}:ecr:${ecrImage[2]}:${ecrImage[1]}:repository/${ecrImage[3]}`;
    }
    if (repository) {
      role.addToPolicy(
        new iam.PolicyStatement({
          sid: 'PullImage',
          actions: ['ecr:BatchGetImage', 'ecr:GetDownloadUrlForLayer', 'ecr:BatchCheckLayerAvailability'],
          resources: [repository],
        }),
      );
    }
    const logGroup = `/aws/sagemaker/Endpoints/${endpointName}`;
    role.addToPolicy(
      new iam.PolicyStatement({
        sid: 'EndpointLogs',
        actions: ['logs:CreateLogGroup', 'logs:CreateLogStream', 'logs:PutLogEvents'],
        resources: [logGroupStreams(logGroup)],
      }),
    );
    // Neither action has resource-level permissions: AWS allows only "*".
    role.addToPolicy(new iam.PolicyStatement({ sid: 'EcrToken', actions: ['ecr:GetAuthorizationToken'], resources: ['*'] }));
    role.addToPolicy(
      new iam.PolicyStatement({
        sid: 'EndpointMetrics',
        actions: ['cloudwatch:PutMetricData'],
        resources: ['*'],
        conditions: { StringEquals: { 'cloudwatch:namespace': '/aws/sagemaker/Endpoints' } },
      }),
    );
    Validations.of(role).acknowledge(
      {
        id: 'AwsSolutions-IAM5[Resource::*]',
        reason: 'ecr:GetAuthorizationToken and cloudwatch:PutMetricData have no resource-level permissions; the latter is limited to SageMaker endpoint metrics by condition.',
      },
      {
        id: `AwsSolutions-IAM5[Resource::${logGroupStreams(logGroup, ['<AWS::Partition>', '<AWS::Region>', '<AWS::AccountId>'])}]`,
        reason: 'SageMaker names the log streams of the endpoint\'s instances itself; the role reaches only this endpoint\'s log group.',
      },
    );
    const model = new sagemaker.CfnModel(this, 'FallbackModel', {
      executionRoleArn: role.roleArn,
      primaryContainer: { image: imageUri, modelDataUrl: artifact.s3ObjectUrl },
    });
    // SageMaker checks that the role can read the artifact when it creates the model.
    model.node.addDependency(role.node.findChild('DefaultPolicy'));
    const endpointConfig = new sagemaker.CfnEndpointConfig(this, 'FallbackEndpointConfig', {
      productionVariants: [
        {
          variantName: 'AllTraffic',
          modelName: model.attrModelName,
          initialInstanceCount: config.fallback.instanceCount,
          instanceType: config.fallback.instanceType,
          initialVariantWeight: 1,
        },
      ],
    });
    Validations.of(model).acknowledge(
      { id: 'AwsSolutions-SM1', reason: 'The fallback needs no network of ours: SageMaker loads its model from S3 and the workers call it through the SageMaker runtime API.' },
    )
    Validations.of(endpointConfig).acknowledge(
      { id: 'AwsSolutions-SM2', reason: 'The endpoint holds only the digits XGBoost model, public data; its ML storage volume keeps SageMaker\'s default encryption.' },
    )
    return new sagemaker.CfnEndpoint(this, 'FallbackEndpoint', {
      endpointName,
      endpointConfigName: endpointConfig.attrEndpointConfigName,
    });
  }
}

/**
 * The standard OpenTelemetry variables that send a worker's metrics and traces to the collector
 * beside it, named for its stage and environment.
 */
function otelEnvironment(stage: Stage, config: EnvironmentConfig): Record<string, string> {
  return {
    OTEL_EXPORTER_OTLP_ENDPOINT: `http://localhost:${OTLP_HTTP_PORT}`,
    OTEL_SERVICE_NAME: `sluice-${stage}`,
    OTEL_RESOURCE_ATTRIBUTES: `deployment.environment=${config.name}`,
    OTEL_TRACES_SAMPLER: 'parentbased_traceidratio',
    OTEL_TRACES_SAMPLER_ARG: String(config.telemetry.traceSampleRatio),
  };
}

/**
 * The objects a `claimCheckBuckets` entry lets the workers read: every key of `bucket`, or those
 * under `prefix` of `bucket/prefix`.
 */
function producerObjects(entry: string, partition: string = Aws.PARTITION): string {
  const [bucket, ...rest] = entry.split('/');
  // A prefix is a folder, as sluice reads it: `team-a` is `team-a/`, not `team-ab/`.
  const folder = rest.join('/').replace(/\/+$/, '');
  return `arn:${partition}:s3:::${bucket}/${folder ? `${folder}/` : ''}*`;
}

/** The claim-check objects, by the bucket's name (so the ARN reads the same in every template). */
/** The stages that read a producer's claim-checked object: ingest checks it, features decodes it. */
function readsProducerObjects(stage: Stage): boolean {
  return stage === 'ingest' || stage === 'features';
}

function claimCheckObjects(data: DataStack, partition: string = Aws.PARTITION): string {
  return `${claimCheckBucket(data, partition)}/${RESOURCES.claim_check_key_prefix}*`;
}

function claimCheckBucket(data: DataStack, partition: string = Aws.PARTITION): string {
  return `arn:${partition}:s3:::${resourceName(data.prefix, RESOURCES.bucket)}`;
}

/** The log streams of one log group, in pseudo-parameters (as cdk-nag names them, given theirs). */
function logGroupStreams(logGroup: string, [partition, region, account] = [Aws.PARTITION, Aws.REGION, Aws.ACCOUNT_ID]): string {
  return `arn:${partition}:logs:${region}:${account}:log-group:${logGroup}:*`;
}
